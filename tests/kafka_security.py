"""The production Kafka security path on a private broker: TLS material made with keytool,
SCRAM-SHA-512 users and the ACLs of deploy/k8s/base/kafka/users.yaml (Strimzi's KafkaUsers)
applied with Kafka's own tools, so the tests run the services against exactly what production
grants them.

The broker is scripts/kafka.sh with ``KAFKA_SASL_SSL_PORT``/``KAFKA_SECURE_DIR``: services
talk SASL_SSL; the PLAINTEXT listener is the broker's own and the tooling's (super user).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from tests.services import KAFKA_SCRIPT, ROOT, LocalKafka, free_port, free_port_pair

USERS_YAML = ROOT / "deploy" / "k8s" / "base" / "kafka" / "users.yaml"
ADMIN = "admin"  # super user on the SASL_SSL listener (scripts/kafka.sh)

# Strimzi's simple authorization → kafka-acls (org.apache.kafka.tools.AclCommand) options.
_RESOURCE_OPTION = {"topic": "--topic", "group": "--group", "transactionalId": "--transactional-id"}


@dataclass(frozen=True)
class Tls:
    """A CA (PEM, for Python clients: KAFKA_SSL_CAFILE) and a broker keystore it signed."""

    ca_pem: Path
    keystore: Path
    password: str


def _run(*args: str | Path) -> None:
    command = [str(a) for a in args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{args[0]} {args[1]} failed: {done.stderr[-1500:]}")


_OPENSSL_CA = """[ca]
default_ca = ca
[ca]
database = {folder}/index.txt
new_certs_dir = {folder}
serial = {folder}/serial
default_md = sha256
policy = any
copy_extensions = none
unique_subject = no
[any]
commonName = supplied
[broker]
basicConstraints = critical,CA:false
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
"""


def make_tls(folder: Path, *, expired: bool = False, tool: str | None = None) -> Tls:
    """A CA and a broker certificate for 127.0.0.1/localhost (SAN) signed by it: valid now,
    or (``expired``) valid for one day that ended two days ago. EC P-256 keys; the broker's
    key and chain in a PKCS12 keystore. openssl when present (milliseconds), else keytool
    (Java's, always there for the broker; a JVM start per step)."""
    folder.mkdir(parents=True, exist_ok=True)
    tls = Tls(folder / "ca.pem", folder / "broker.p12", secrets.token_hex(12))
    tool = tool or ("openssl" if shutil.which("openssl") else "keytool")
    (_openssl_tls if tool == "openssl" else _keytool_tls)(folder, tls, expired=expired)
    return tls


def _openssl_tls(folder: Path, tls: Tls, *, expired: bool) -> None:
    ca_key, key, csr, cert = (folder / n for n in ("ca.key", "broker.key", "broker.csr", "b.pem"))
    config = folder / "ca.cnf"
    config.write_text(_OPENSSL_CA.format(folder=folder))
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text(f"{secrets.randbits(64):016X}\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _run("openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", tls.ca_pem, "-days", "30",
         "-subj", "/CN=onoff-events test CA", "-addext", "basicConstraints=critical,CA:true",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    _run("openssl", "req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    if expired:
        now = datetime.now(UTC)
        dates = ["-startdate", _asn1(now - timedelta(days=3)),
                 "-enddate", _asn1(now - timedelta(days=2))]  # fmt: skip
    else:
        dates = ["-days", "30"]
    _run("openssl", "ca", "-batch", "-notext", "-config", config, "-extensions", "broker",
         "-cert", tls.ca_pem, "-keyfile", ca_key, "-in", csr, "-out", cert, *dates)  # fmt: skip
    _run("openssl", "pkcs12", "-export", "-name", "broker", "-in", cert, "-inkey", key,
         "-certfile", tls.ca_pem, "-out", tls.keystore,
         "-passout", f"pass:{tls.password}")  # fmt: skip


def _asn1(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%SZ")


def _keytool_tls(folder: Path, tls: Tls, *, expired: bool) -> None:
    ca_store, csr, cert = folder / "ca.p12", folder / "broker.csr", folder / "b.pem"
    store = ("-storetype", "PKCS12", "-storepass", tls.password, "-keypass", tls.password)
    ec = ("-keyalg", "EC", "-groupname", "secp256r1")
    _run("keytool", "-genkeypair", "-alias", "ca", *ec, "-validity", "30",
         "-dname", "CN=onoff-events test CA", "-ext", "bc:c=ca:true",
         "-ext", "ku:c=keyCertSign,cRLSign", "-keystore", ca_store, *store)  # fmt: skip
    _run("keytool", "-exportcert", "-rfc", "-alias", "ca", "-keystore", ca_store,
         "-file", tls.ca_pem, *store)  # fmt: skip
    _run("keytool", "-genkeypair", "-alias", "broker", *ec, "-validity", "30",
         "-dname", "CN=localhost", "-keystore", tls.keystore, *store)  # fmt: skip
    _run("keytool", "-certreq", "-alias", "broker", "-keystore", tls.keystore, "-file", csr,
         *store)  # fmt: skip
    validity = ("-startdate", "-3d", "-validity", "1") if expired else ("-validity", "30")
    _run("keytool", "-gencert", "-rfc", "-alias", "ca", "-keystore", ca_store, "-infile", csr,
         "-outfile", cert, "-ext", "san=ip:127.0.0.1,dns:localhost",
         "-ext", "ku:c=digitalSignature,keyEncipherment", "-ext", "eku=serverAuth",
         *validity, *store)  # fmt: skip
    # The reply as a whole chain (broker, CA): keytool links it to the broker's key.
    cert.write_text(cert.read_text() + tls.ca_pem.read_text())
    _run("keytool", "-importcert", "-noprompt", "-alias", "broker", "-file", cert,
         "-keystore", tls.keystore, *store)  # fmt: skip


@dataclass(frozen=True)
class Acl:
    """One ACL rule of a KafkaUser (Strimzi ``simple`` authorization)."""

    resource_type: str
    name: str
    pattern_type: str
    operations: tuple[str, ...]
    host: str = "*"


def kafka_users(path: Path = USERS_YAML) -> dict[str, tuple[Acl, ...]]:
    """KafkaUser name → its ACLs, read from the Strimzi manifest. Only what these tests know
    how to apply is accepted: anything else fails loudly, never silently grants less."""
    users: dict[str, tuple[Acl, ...]] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") != "KafkaUser":
            continue
        name, spec = doc["metadata"]["name"], doc["spec"]
        if spec["authentication"]["type"] != "scram-sha-512":
            raise ValueError(f"{name}: only scram-sha-512 authentication is tested")
        authorization = spec["authorization"]
        if authorization["type"] != "simple":
            raise ValueError(f"{name}: only simple authorization is tested")
        acls = []
        for rule in authorization["acls"]:
            resource = rule["resource"]
            if rule.get("type", "allow") != "allow":
                raise ValueError(f"{name}: only allow rules are tested")
            acls.append(
                Acl(
                    resource["type"],
                    resource.get("name", ""),
                    resource.get("patternType", "literal"),
                    tuple(rule.get("operations") or [rule["operation"]]),
                    rule.get("host", "*"),
                )
            )
        users[name] = tuple(acls)
    return users


def acl_commands(bootstrap: str, user: str, acls: Sequence[Acl]) -> list[list[str]]:
    """kafka-acls argument lists granting ``acls`` to User:``user``: one command per pattern
    type, host and set of operations (the tool grants every operation on every resource
    named)."""
    grouped: dict[tuple[str, str, tuple[str, ...]], list[Acl]] = defaultdict(list)
    for acl in acls:
        grouped[(acl.pattern_type, acl.host, tuple(sorted(acl.operations)))].append(acl)
    commands = []
    for (pattern, host, operations), same in grouped.items():
        args = ["--bootstrap-server", bootstrap, "--add", "--allow-principal", f"User:{user}"]
        # Strimzi says "prefix" where kafka-acls says "prefixed".
        kind = {"prefix": "prefixed"}.get(pattern, pattern)
        args += ["--allow-host", host, "--resource-pattern-type", kind]
        for acl in same:
            if acl.resource_type == "cluster":
                args.append("--cluster")
            else:
                args += [_RESOURCE_OPTION[acl.resource_type], acl.name]
        for operation in operations:
            args += ["--operation", operation]
        commands.append(args)
    return commands


def kafka_class(*args: str, timeout: float = 120) -> str:
    """``scripts/kafka.sh class ARGS…`` (a Kafka tool); its stdout. Raises on failure with
    the tool's own words."""
    done = subprocess.run(
        [str(KAFKA_SCRIPT), "class", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def apply_acls(bootstrap: str, users: Mapping[str, Sequence[Acl]]) -> None:
    """Every user's ACLs through kafka-acls, the tools run side by side (each is a JVM)."""
    commands = [c for user, acls in users.items() for c in acl_commands(bootstrap, user, acls)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda c: kafka_class("org.apache.kafka.tools.AclCommand", *c), commands))


def set_scram_password(bootstrap: str, user: str, password: str) -> None:
    """Create or change a SCRAM-SHA-512 credential on the running cluster (kafka-configs)."""
    kafka_class(
        "kafka.admin.ConfigCommand", "--bootstrap-server", bootstrap, "--alter",
        "--entity-type", "users", "--entity-name", user,
        "--add-config", f"SCRAM-SHA-512=[password={password}]",
    )  # fmt: skip


@dataclass
class SecureKafka:
    """A private broker with a SASL_SSL listener (SCRAM-SHA-512, TLS) and the authorizer on;
    one SCRAM user per name in ``users`` with a random password, plus ``admin``."""

    folder: Path
    tls: Tls
    users: Sequence[str]
    passwords: dict[str, str] = field(default_factory=dict)
    sasl_port: int = 0
    broker: LocalKafka | None = None

    def start(self) -> None:
        secure = self.folder / "secure"
        secure.mkdir(parents=True, exist_ok=True)
        (secure / "broker.p12").write_bytes(self.tls.keystore.read_bytes())
        (secure / "broker.password").write_text(self.tls.password + "\n")
        self.passwords = {name: secrets.token_hex(16) for name in (ADMIN, *self.users)}
        (secure / "scram-users").write_text(
            "".join(f"{name} {password}\n" for name, password in self.passwords.items())
        )
        for attempt in range(3):
            # Ports are free when picked, not reserved: on a busy machine another process may
            # take one before the broker binds it. Then new ports (the storage is kept).
            self.sasl_port = free_port()
            env = {"KAFKA_SASL_SSL_PORT": str(self.sasl_port), "KAFKA_SECURE_DIR": str(secure)}
            self.broker = LocalKafka(self.folder / "kafka", free_port_pair(), env)
            try:
                self.broker.start()
            except subprocess.CalledProcessError:
                log = (self.folder / "kafka" / "kafka.log").read_text(errors="replace")
                if attempt == 2 or "Address already in use" not in log[-20000:]:
                    raise
            else:
                return

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    @property
    def plaintext(self) -> str:
        """The tooling's listener (User:ANONYMOUS, a super user): never a service's."""
        assert self.broker is not None
        return self.broker.bootstrap

    @property
    def sasl_ssl(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    def client_env(self, user: str, password: str | None = None) -> dict[str, str]:
        """The KAFKA_* settings of a service logging in as ``user`` (its own password unless
        ``password`` is given)."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.sasl_ssl,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": user,
            "KAFKA_SASL_PASSWORD": self.passwords[user] if password is None else password,
            "KAFKA_SSL_CAFILE": str(self.tls.ca_pem),
        }

    def create_topics(self, *sinks: str) -> None:
        """``python -m onoff_events.topics SINK…`` as admin over SASL_SSL (as scripts/run.sh
        does on a development broker): sms-events, its DLQ and one DLQ per sink."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("KAFKA_")}
        subprocess.run(
            [sys.executable, "-m", "onoff_events.topics", *sinks],
            cwd=ROOT,
            env={**env, **self.client_env(ADMIN)},
            check=True,
            capture_output=True,
            timeout=60,
        )


def describe_acls(bootstrap: str) -> str:
    """kafka-acls --list: every ACL the cluster holds, as the tool prints them."""
    return kafka_class("org.apache.kafka.tools.AclCommand", "--bootstrap-server", bootstrap,
                       "--list")  # fmt: skip
