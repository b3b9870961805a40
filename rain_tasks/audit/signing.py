"""Signed releases: an OpenSSF model-signing signature over every released file's sha256, and a signed in-toto
SLSA provenance statement.

`sign_manifest` signs {file name: sha256} for every file of a release (the shards, the model card as
released, lineage.json, the provenance statement and release.json, which holds the part digests of the
multipart objects) with model-signing's key signer: an EC private key in PEM (P-256 here, made by
`generate_key_pair`), which works offline. Keyless Sigstore (`SigningConfig(sigstore=True)` and a
`TrustConfig` with identity and issuer) is the same call through model-signing's Sigstore signer, for
machines that reach its public services. `verified_manifest` checks the signature and the signer and
returns the signed digests; `compare_signed` then names every file that is unsigned, missing or changed.

`provenance_envelope` writes the SLSA provenance (https://slsa.dev/provenance/v1) of a release as a DSSE
envelope signed with the same key: the merge's inputs as resolved dependencies (SLSA v1's materials,
every input file's sha256), the released files as subjects.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rain_tasks.io.digest import json_digest

IN_TOTO = "application/vnd.in-toto+json"
STATEMENT = "https://in-toto.io/Statement/v1"
SLSA = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/rain-merging/rain-tasks/merge/v1"
PRIVATE_KEY, PUBLIC_KEY = "release-key.pem", "release-key.pub"


class SignatureError(ValueError):
    """A signature that does not verify (wrong key, edited bundle, changed file); the message says which."""


@dataclass(frozen=True)
class SigningConfig:
    """How a release is signed: a PEM EC private key (offline), or keyless Sigstore."""

    key: Path | None = None
    password: str | None = None
    sigstore: bool = False

    @classmethod
    def from_env(cls, key: str | Path | None = None, sigstore: bool = False) -> SigningConfig:
        """`key`, else $RAIN_SIGNING_KEY (its password in $RAIN_SIGNING_KEY_PASSWORD), or keyless Sigstore."""
        key = key or os.environ.get("RAIN_SIGNING_KEY")
        return cls(Path(key) if key else None, os.environ.get("RAIN_SIGNING_KEY_PASSWORD"), sigstore)

    def signer(self) -> Any:
        """The model-signing signer this configuration names."""
        if self.sigstore:
            from model_signing._signing import sign_sigstore

            return sign_sigstore.Signer()
        if self.key is None:
            raise ValueError("releases are signed: give --key PRIVATE_KEY.pem (or RAIN_SIGNING_KEY), or --sigstore")
        from model_signing._signing import sign_ec_key

        return sign_ec_key.Signer(Path(self.key), self.password)


@dataclass(frozen=True)
class TrustConfig:
    """Whom a verification trusts: a PEM public key, or a Sigstore identity and its OIDC issuer."""

    key: Path | None = None
    identity: str | None = None
    issuer: str | None = None

    def verifier(self) -> tuple[Any, Any]:
        """(the model-signing verifier, the Signature class its bundles are read with)."""
        if self.identity:
            from model_signing._signing import sign_sigstore

            return sign_sigstore.Verifier(identity=self.identity, oidc_issuer=self.issuer or ""), sign_sigstore.Signature
        from model_signing._signing import sign_ec_key, sign_sigstore_pb

        return sign_ec_key.Verifier(Path(self.key)), sign_sigstore_pb.Signature


def generate_key_pair(directory: str | Path) -> tuple[Path, Path]:
    """A P-256 key pair as PEM files in `directory` (kept if present); the private key readable by its owner only."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    private, public = directory / PRIVATE_KEY, directory / PUBLIC_KEY
    if private.is_file() and public.is_file():
        return private, public
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


# --- the release signature ------------------------------------------------------------------------


def sign_manifest(digests: dict[str, str], config: SigningConfig, name: str = "model") -> bytes:
    """The model-signing bundle (JSON bytes) over {file name: sha256} of every released file."""
    from model_signing import manifest
    from model_signing._hashing.hashing import Digest
    from model_signing._signing import signing

    serialization = manifest._FileSerialization("sha256", allow_symlinks=False)
    items = [manifest.FileManifestItem(path=Path(n), digest=Digest("sha256", bytes.fromhex(d))) for n, d in sorted(digests.items())]
    signature = config.signer().sign(signing.Payload(manifest.Manifest(name, items, serialization)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.json"
        signature.write(path)
        return path.read_bytes()


def verified_manifest(bundle: bytes, trust: TrustConfig) -> dict[str, str]:
    """{file name: sha256} that `bundle` signs, once its signature and signer check out; SignatureError otherwise."""
    verifier, signature_type = trust.verifier()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bundle.json"
            path.write_bytes(bundle)
            signed = verifier.verify(signature_type.read(path))
    except Exception as e:  # noqa: BLE001 - model-signing and cryptography raise several types for one answer
        raise SignatureError(f"the release signature does not verify with the trusted key or identity "
                             f"({type(e).__name__}: {e or 'invalid signature'})") from e
    return {rd.identifier: rd.digest.digest_value.hex() for rd in signed.resource_descriptors()}


def compare_signed(signed: dict[str, str], found: dict[str, str]) -> list[str]:
    """One problem per file that is unsigned (present, not signed), missing (signed, absent) or changed."""
    problems = []
    for name in sorted(signed.keys() | found.keys()):
        was, now = signed.get(name), found.get(name)
        if was == now:
            continue
        if now is None:
            problems.append(f"signature: {name} is signed but missing")
        elif was is None:
            problems.append(f"signature: {name} is not covered by the signature (unsigned file)")
        else:
            problems.append(f"signature: {name} differs from the signed sha256 {was[:12]}… (now {now[:12]}…)")
    return problems


# --- provenance -----------------------------------------------------------------------------------


def provenance_statement(core: dict, lineage_digest: str, subjects: dict[str, str]) -> dict:
    """The in-toto SLSA v1 provenance of a release: inputs (from the lineage core) as resolved dependencies,
    the released files as subjects."""
    dependencies = [{"name": f"{role}:{name}", "uri": f"file:{rec['path']}" + (f"/{name}" if name != Path(rec['path']).name else ""),
                     "digest": {"sha256": sha}}
                    for role, rec in sorted(core["inputs"].items()) for name, sha in sorted(rec["files"].items())]
    return {
        "_type": STATEMENT,
        "subject": [{"name": name, "digest": {"sha256": sha}} for name, sha in sorted(subjects.items())],
        "predicateType": SLSA,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"method": core["method"], "method_params": core["method_params"],
                                       "params": core["params"]},
                "internalParameters": {"stages": core.get("stages", [])},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": BUILD_TYPE}, "metadata": {"invocationId": lineage_digest}},
        },
    }


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding of a payload."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def provenance_envelope(statement: dict, config: SigningConfig) -> bytes:
    """The statement as a DSSE envelope signed with the release key (unsigned under keyless Sigstore, where the
    release signature, which covers this file, is its signature)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signatures = []
    if config.key is not None and not config.sigstore:
        key = serialization.load_pem_private_key(Path(config.key).read_bytes(), config.password and config.password.encode())
        sig = key.sign(_pae(IN_TOTO, payload), ec.ECDSA(hashes.SHA256()))
        signatures.append({"keyid": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()})
    envelope = {"payload": base64.b64encode(payload).decode(), "payloadType": IN_TOTO, "signatures": signatures}
    return json.dumps(envelope, indent=2, sort_keys=True).encode() + b"\n"


def key_id(public_key: Any) -> str:
    """sha256 of a public key's DER encoding: names the signer in a DSSE envelope."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def provenance_problems(envelope: bytes, trust: TrustConfig, signed: dict[str, str]) -> list[str]:
    """The provenance envelope must carry a signature by the trusted key and name the signed files as subjects."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        doc = json.loads(envelope)
        payload = base64.b64decode(doc["payload"])
        statement = json.loads(payload)
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    except (ValueError, KeyError, TypeError) as e:
        return [f"provenance: not a DSSE envelope of an in-toto statement ({e})"]
    problems = []
    if trust.key is not None:
        public = serialization.load_pem_public_key(Path(trust.key).read_bytes())
        ok = False
        for s in doc.get("signatures", []):
            try:
                public.verify(base64.b64decode(s["sig"]), _pae(doc["payloadType"], payload), ec.ECDSA(hashes.SHA256()))
                ok = True
            except (InvalidSignature, KeyError, ValueError):
                continue
        if not ok:
            problems.append("provenance: the statement carries no signature by the trusted key")
    wrong = sorted(n for n, sha in subjects.items() if signed.get(n) != sha)
    if wrong or statement.get("predicateType") != SLSA:
        problems.append(f"provenance: subjects disagree with the signed files: {wrong[:5]}" if wrong else
                        f"provenance: predicate type {statement.get('predicateType')!r}, expected {SLSA}")
    return problems


def manifest_digest(digests: dict[str, str]) -> str:
    """One digest of a set of file digests (names a release's staging prefix, so a rerun finds its own uploads)."""
    return json_digest(digests)
