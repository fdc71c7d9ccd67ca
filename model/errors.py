"""The model package's exceptions: one base class, one subclass per kind of failure.

```
ModelError
├── TokenizeError          a patient's data does not fit the contract (names patient and place)
├── InputError             tensors handed to the network do not fit its contract
├── UnknownPresetError     a preset name the registry does not know
└── DeviceUnavailableError the accelerator asked for is not usable here (never a fallback)
```
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by `model`."""


class TokenizeError(ModelError, ValueError):
    """One patient's data cannot be encoded under the contract.

    The message names the patient and where the problem is (feature, token, position),
    so a site can report it without showing the data itself.
    """

    def __init__(self, patient_id: str, problem: str) -> None:
        super().__init__(f"patient {patient_id}: {problem}")
        self.patient_id = patient_id
        self.problem = problem


class InputError(ModelError, ValueError):
    """Tensors handed to the network or to `split_tensors` do not fit the contract's layout."""


class UnknownPresetError(ModelError, ValueError):
    """The preset name is not one the registry knows."""


class DeviceUnavailableError(ModelError, RuntimeError):
    """The device asked for cannot be used here; the message says why in one line."""
