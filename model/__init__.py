"""The shared model: data contract, samples and tokenizers, the fusion network and presets,
devices, training and evaluation steps, and the wire contract (`medfed.model.wire`).

Imports no other medfed room (only `medfed.common`).

The names below are the room's public API for the other rooms; each is imported from its
module when first used, so naming one costs nothing for the rest.
"""

if __name__ != "medfed.model":  # the folder is installed only as medfed.model
    raise ImportError(
        f"this folder is the package medfed.model: import medfed.model, not {__name__}"
    )

from typing import TYPE_CHECKING

from medfed.common.exports import lazy_exports

if TYPE_CHECKING:
    from medfed.model.contract import DEMO_CONTRACT as DEMO_CONTRACT
    from medfed.model.contract import StudyContract as StudyContract
    from medfed.model.contract import TaskSpec as TaskSpec
    from medfed.model.device_kinds import DEVICE_KINDS as DEVICE_KINDS
    from medfed.model.device_kinds import DeviceKind as DeviceKind
    from medfed.model.devices import resolve_device as resolve_device
    from medfed.model.errors import ModelError as ModelError
    from medfed.model.network import arrays_sha256 as arrays_sha256
    from medfed.model.network import build_model as build_model
    from medfed.model.network import model_identity as model_identity
    from medfed.model.network import parameter_group as parameter_group
    from medfed.model.network import state_arrays as state_arrays
    from medfed.model.presets import PRESET_NAMES as PRESET_NAMES
    from medfed.model.presets import PresetName as PresetName
    from medfed.model.sample import PatientSample as PatientSample
    from medfed.model.train import train_steps as train_steps

_EXPORTS = {
    "DEMO_CONTRACT": "contract",
    "DEVICE_KINDS": "device_kinds",
    "DeviceKind": "device_kinds",
    "ModelError": "errors",
    "PRESET_NAMES": "presets",
    "PatientSample": "sample",
    "PresetName": "presets",
    "StudyContract": "contract",
    "TaskSpec": "contract",
    "arrays_sha256": "network",
    "build_model": "network",
    "model_identity": "network",
    "parameter_group": "network",
    "resolve_device": "devices",
    "state_arrays": "network",
    "train_steps": "train",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = [
    "DEMO_CONTRACT",
    "DEVICE_KINDS",
    "PRESET_NAMES",
    "DeviceKind",
    "ModelError",
    "PatientSample",
    "PresetName",
    "StudyContract",
    "TaskSpec",
    "arrays_sha256",
    "build_model",
    "model_identity",
    "parameter_group",
    "resolve_device",
    "state_arrays",
    "train_steps",
]
