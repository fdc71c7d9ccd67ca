"""The study's contract as it arrives in an instruction: decoded strictly, checked
against its announced digest, and size-limited before it is parsed.

The coordinator sends the contract's canonical JSON (`wire.CONTRACT`) and its SHA-256
(`wire.CONTRACT_SHA256`) with every train, evaluate and query message; the site trains
only on a contract it could decode and whose digest matches.
"""

from __future__ import annotations

from pydantic import ValidationError

from medfed.client.errors import SiteRefusal
from medfed.model import wire
from medfed.model.contract import StudyContract


def decode_contract(text: str, sha256: str) -> StudyContract:
    """The contract in `text`; `SiteRefusal` (one line) if it is too large, malformed,
    or does not match `sha256`."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > wire.MAX_CONTRACT_BYTES:
        raise SiteRefusal(
            f"the study's contract is {size} bytes, over the limit of {wire.MAX_CONTRACT_BYTES}"
        )
    try:
        contract = StudyContract.model_validate_json(text, strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise SiteRefusal(
            f"the study's contract is malformed: key {key}: {first['msg']}"[:400]
        ) from exc
    actual = contract.sha256()
    if actual != sha256:
        raise SiteRefusal(
            f"the study's contract does not match its announced digest ({actual[:12]} !="
            f" {sha256[:12]}); refusing it"
        )
    return contract
