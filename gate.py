"""Who may register: the policy keys, nonces and refusals of PROTOCOL.md sections 7
and 9, as pure code (no sockets; the clock and the nonce source are injected).

The proxy keeps one ``Attempt`` per registration connection and asks the
``RegistrationGate`` about every SETUP that comes on it:

* ``check(attempt, setup, has_certificate)`` returns when the SETUP may register and
  raises ``ServiceError(UNAUTHORIZED)`` naming the reason otherwise (a ``Challenge``
  when the SETUP came without a proof: the first step of the exchange, not a fault);
* ``refusal(attempt, exc)`` turns that refusal into the ERROR to send back, with a
  fresh nonce when keys are in force (that ERROR is the challenge), and says whether
  the connection must now be closed (``MAX_FAILURES`` refusals on one connection).

``load_policy_keys`` reads the key file; ``reload`` swaps the keys in force (SIGHUP)
and reports what changed, without touching any registration already made.
"""

import secrets
import time

import protocol
from protocol import ServiceError, policy_text, show

__all__ = ["NONCE_LIFETIME", "MAX_FAILURES", "Attempt", "Challenge", "Incurable", "RegistrationGate",
           "load_policy_keys", "key_file_lines"]

# A nonce is good once, for this many seconds (PROTOCOL.md section 9). A server
# answers a challenge in milliseconds; 10 s covers a slow TLS peer and is short
# enough that a captured nonce is useless. Kerberos allows 5 minutes of clock skew,
# but here the proxy is both issuer and checker, so no skew applies.
NONCE_LIFETIME = 10.0
# Refused SETUPs on one connection before the proxy closes it. sshd's MaxAuthTries
# is 6; 3 lets a server answer one challenge and retry once.
MAX_FAILURES = 3


class Attempt:
    """The registration state of one connection: the nonce it was issued last and
    when, how many SETUPs were refused on it, and the challenge it owes an answer."""

    __slots__ = ("nonce", "issued", "failures", "challenged")

    def __init__(self):
        self.nonce = None
        self.issued = 0.0
        self.failures = 0
        # (id, policy) of the SETUP whose challenge is not answered yet, or None.
        self.challenged = None


class Challenge(ServiceError):
    """UNAUTHORIZED for a SETUP that came without a proof while keys are in force: the
    challenge of PROTOCOL.md section 9, which a server that has the key answers."""

    def __init__(self, message):
        super().__init__(message, protocol.UNAUTHORIZED)


class Incurable(ServiceError):
    """UNAUTHORIZED that no proof can cure: the policy has no key, or a TLS client
    certificate is missing. Answered without a nonce, so that a server with a key
    does not send a proof in vain (PROTOCOL.md section 9)."""

    def __init__(self, message):
        super().__init__(message, protocol.UNAUTHORIZED)


class RegistrationGate:
    """Checks SETUPs against the policy keys in force and a client certificate.

    Args:
        keys: ``{policy text or "*": key bytes}``, or None: registration is open.
        require_certificate: a SETUP must come with a verified TLS client
            certificate (mutual TLS).
        clock: ``f() -> seconds``, monotonic.
        token: ``f() -> str``, a fresh unguessable nonce (32 hex digits).
    """

    def __init__(self, keys=None, *, require_certificate=False, clock=time.monotonic,
                 token=lambda: secrets.token_hex(16)):
        self.keys = keys
        self.require_certificate = require_certificate
        self._clock = clock
        self._token = token

    @property
    def open(self):
        """True when no keys are in force: any server may serve any policy."""
        return self.keys is None

    def check(self, attempt, message, has_certificate=False):
        """Decide whether a validated SETUP ``message`` may register.

        Takes the attempt's nonce: a nonce is good for one SETUP.

        Raises:
            Challenge: keys are in force and the SETUP has no proof.
            ServiceError: UNAUTHORIZED, with a message naming the reason.
        """
        policy = message["privPolyId"]
        if self.require_certificate and not has_certificate:
            raise Incurable("registration needs a TLS client certificate signed by the "
                            "proxy's -tls-ca authority")
        if self.keys is None:
            return
        key = self.keys.get(policy_text(policy), self.keys.get("*"))
        if key is None:
            raise Incurable(f"no server may register for privacy policy {show(policy)}: "
                            "it has no key")
        if "proof" not in message:
            raise Challenge(f"registration for privacy policy {show(policy)} needs a "
                            "proof: answer with the nonce of this ERROR and the proof "
                            "(HMAC-SHA256)")
        if not self._take_nonce(attempt, message.get("nonce")):
            raise ServiceError("the SETUP's nonce was not issued on this connection, was "
                               f"used already or is older than {NONCE_LIFETIME:g} s",
                               protocol.UNAUTHORIZED)
        if not protocol.check_setup_proof(key, message["nonce"], message):
            raise ServiceError(f"wrong proof for privacy policy {show(policy)} (server id "
                               f"{show(message['id'])})", protocol.UNAUTHORIZED)

    def _take_nonce(self, attempt, nonce):
        good = (attempt.nonce is not None and isinstance(nonce, str)
                and secrets.compare_digest(nonce, attempt.nonce)
                and self._clock() - attempt.issued <= NONCE_LIFETIME)
        attempt.nonce = None
        return good

    def refusal(self, attempt, exc):
        """Count a refused SETUP and build the answer.

        Args:
            exc: the ServiceError that refused it.

        Returns:
            (dict, bool): the ERROR message to send (with a fresh ``nonce`` when keys
            are in force, a proof can cure it and the connection stays open), and True
            when the connection must be closed after it (``MAX_FAILURES`` refusals).
        """
        attempt.failures += 1
        answer = protocol.error_message(exc)
        close = attempt.failures >= MAX_FAILURES
        if self.keys is not None and not close and not isinstance(exc, Incurable):
            attempt.nonce = self._token()
            attempt.issued = self._clock()
            answer["nonce"] = attempt.nonce
        return answer, close

    def reload(self, keys):
        """Put ``keys`` (as ``load_policy_keys`` returns) in force for the SETUPs to
        come; registrations already made stay.

        Returns:
            (added, removed, changed): sorted lists of policy texts (``"*"`` included).
        """
        old = self.keys or {}
        self.keys = keys
        return (sorted(set(keys) - set(old)), sorted(set(old) - set(keys)),
                sorted(policy for policy in set(old) & set(keys) if old[policy] != keys[policy]))


# Characters of a key file read at most: 1 MiB holds ~10,000 policies and their keys;
# a path that names /dev/zero or a log file by mistake must not fill the memory.
# nginx caps a configuration line the same way (its buffer is 4 KiB).
KEY_FILE_LIMIT = 1 << 20


def key_file_lines(path, what):
    """The lines of a key file that hold something, without ``#`` comments and
    surrounding blanks: a list of ``(line number, text)``.

    Args:
        what: the kind of file, for the error ("policy key file", "key file").

    A UTF-8 byte order mark at the start (Windows editors write one) is not part of
    the first line.

    Raises:
        ValueError: the file cannot be read, is not UTF-8 or is larger than
            ``KEY_FILE_LIMIT``; the message names it.
    """
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read(KEY_FILE_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} '{path}': "
                         f"{getattr(exc, 'strerror', None) or exc}") from None
    if len(text) > KEY_FILE_LIMIT:
        raise ValueError(f"cannot read {what} '{path}': it is larger than "
                         f"{KEY_FILE_LIMIT:,} characters (not a key file?)")
    # Lines as an editor numbers them: str.splitlines would also split at form feeds
    # and U+2028, and the numbers in the errors would not match.
    lines = [line.rstrip("\r") for line in text.split("\n")]
    kept = ((number, line.split("#", 1)[0].strip()) for number, line in enumerate(lines, 1))
    return [(number, text) for number, text in kept if text]


def load_policy_keys(path):
    """Read a policy key file: one ``POLICY KEY`` pair per line, ``#`` comments
    (PROTOCOL.md section 9).

    Returns:
        dict: policy text (or ``"*"``) -> key bytes.

    Raises:
        ValueError: unreadable file, a malformed line, or a policy given a key twice
            (which key was meant cannot be known: nginx refuses a duplicate
            directive the same way), named with its line number.
    """
    keys = {}
    lines = {}  # policy -> the number of the line that gave its key
    for number, line in key_file_lines(path, "policy key file"):
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path} line {number}: expected 'POLICY KEY', got {len(fields)} "
                             "fields")
        if fields[0] in lines:
            raise ValueError(f"{path} line {number}: policy '{fields[0]}' already has a key "
                             f"on line {lines[fields[0]]}")
        lines[fields[0]] = number
        keys[fields[0]] = fields[1].encode("utf-8")
    if not keys:
        raise ValueError(f"policy key file '{path}' has no 'POLICY KEY' line")
    return keys
