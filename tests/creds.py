"""NATS decentralized auth for the tests: an operator, an account with JetStream and a user, as
JWTs signed with nkeys, the server config lines that trust them, and the user's .creds file."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from pathlib import Path

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object]) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": uuid.uuid4().hex.upper(),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    body = header + "." + _b64(json.dumps(claims).encode())
    return body + "." + _b64(issuer.sign(body.encode()))


def decentralized_auth(folder: Path) -> tuple[str, Path]:
    """Server config lines trusting a fresh operator, and the path of a user's .creds file."""
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    op_pub, acc_pub, sys_pub = (k.public_key.decode() for k in (operator, account, system))
    unlimited = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    op_jwt = _jwt(operator, op_pub, "op", {"type": "operator", "system_account": sys_pub})
    sys_jwt = _jwt(operator, sys_pub, "sys", {"type": "account", "limits": unlimited})
    acc_jwt = _jwt(operator, acc_pub, "acc", {"type": "account", "limits": {**unlimited, **jetstream}})
    user_jwt = _jwt(account, user.public_key.decode(), "user", {"type": "user", "subs": -1, "data": -1, "payload": -1})
    creds = folder / "user.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    config = (
        f'operator: "{op_jwt}"\nsystem_account: {sys_pub}\nresolver: MEMORY\n'
        f'resolver_preload: {{ {acc_pub}: "{acc_jwt}", {sys_pub}: "{sys_jwt}" }}'
    )
    return config, creds
