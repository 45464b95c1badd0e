"""Trust: identities, signed and encrypted envelopes, and the audit ledger.

* `keys`: Ed25519 + X25519 identities in PEM files; the public records a scenario enrolls.
* `envelope`: `Sender.seal` / `Receiver.open` with typed rejections and byte overhead.
* `ledger`: the append-only, hash-chained, signed run ledger; `ledger_verify.verify` checks
  it, `audit.verify_run` a run folder against it with keys an auditor brings.

Only the `cryptography` package does cryptography here.
"""

from edgeddl.security.envelope import Opened, Receiver, Rejection, Sender, overhead_bytes
from edgeddl.security.keys import Identity, PublicIdentity, SecurityError, enrolled
from edgeddl.security.ledger import Ledger
from edgeddl.security.ledger_verify import VerifyReport, verify

__all__ = [
    "Identity",
    "Ledger",
    "Opened",
    "PublicIdentity",
    "Receiver",
    "Rejection",
    "SecurityError",
    "Sender",
    "VerifyReport",
    "enrolled",
    "overhead_bytes",
    "verify",
]
