"""The README's path to a relay on a SASL_SSL cluster with a private CA ("From nothing to a running relay on
a cluster", steps 2 and 3), run as written: the fenced blocks after the marker are run by bash in a scratch
copy of deploy/ with a scratch HOME, `processor` from the virtualenv and a `kubectl` that renders and
records instead of reaching a cluster. The blocks are found by their marker, so a README that drifts
(a block renamed, moved, or a command that no longer works in a shell) fails here."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.tools import DEPLOY, EXAMPLE_CONFIG, ROOT, tool

README = ROOT / "README.md"
MARKER = "<!-- README test: the SASL_SSL path"
BLOCK = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.S | re.M)
LOOP = 'while IFS= read -r line; do export "$line"; done < ~/relay-credentials.env'
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBexample\n-----END CERTIFICATE-----\n"

# what the scratch `kubectl` does: `kustomize` as the real one; `create` as the real one with
# --dry-run=client -o yaml (the object it would create, kept); anything else recorded only
KUBECTL_STUB = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
log = os.environ["KUBECTL_LOG"]
entry = {{"args": args}}
if "kustomize" in args or "create" in args:
    extra = ["--dry-run=client", "-o", "yaml"] if "create" in args else []
    out = subprocess.run(["{kubectl}", *args, *extra], capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    entry["output"] = out.stdout
    if out.returncode:
        sys.exit(out.returncode)
    if "kustomize" in args:
        sys.stdout.write(out.stdout)
with open(log, "a") as f:
    f.write(json.dumps(entry) + "\\n")
"""


def sasl_blocks() -> list[str]:
    """The bash blocks right after each marker, dedented (they sit in a numbered list)."""
    blocks = []
    for part in README.read_text().split(MARKER)[1:]:
        after = part.split("-->", 1)[1].lstrip("\n")
        match = BLOCK.match(after)
        assert match, "a README test marker must be followed by its ```bash block"
        blocks.append(textwrap.dedent(match.group(1) + match.group(2)))
    return blocks


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the README's blocks, in order, in a scratch copy; what they printed and what `kubectl` got."""
    root = tmp_path_factory.mktemp("readme")
    repo, home, bin_dir = root / "repo", root / "home", root / "bin"
    shutil.copytree(DEPLOY, repo / "deploy")
    home.mkdir()
    (home / "kafka-ca.pem").write_text(CA_PEM)  # the operator's CA bundle
    bin_dir.mkdir()
    stub = bin_dir / "kubectl"
    stub.write_text(KUBECTL_STUB.format(python=sys.executable, kubectl=tool("kubectl")))
    stub.chmod(0o755)
    env = {"HOME": str(home), "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin",
                                                      "/bin"]),
           "KUBECTL_LOG": str(root / "kubectl.log"), "LANG": "C.UTF-8", "HOSTNAME": "pod-7"}
    runs = []
    for block in sasl_blocks():
        done = subprocess.run(["bash", "-e", "-c", block], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, f"{block}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
        runs.append(done)
    log = root / "kubectl.log"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"repo": repo, "home": home, "env": env, "runs": runs, "kubectl": calls}


def test_the_readme_has_the_sasl_path_blocks():
    blocks = sasl_blocks()
    assert len(blocks) == 2
    assert "overlays/example-sasl-ssl" in blocks[0]
    assert "processor check-config" in blocks[1] and LOOP in blocks[1]


def test_check_config_sees_sasl_ssl_the_mechanism_the_credentials_and_the_ca(scratch):
    out = scratch["runs"][1].stdout
    effective = yaml.safe_load(out[:out.index("# ")] if out.startswith("# ") else out)
    client = effective["kafka"]["client"]
    assert client["security.protocol"] == "SASL_SSL"
    assert client["sasl.mechanism"] == "SCRAM-SHA-512"
    assert client["sasl.username"] == client["sasl.password"] == "***"
    assert client["ssl.ca.location"] == str(scratch["home"] / "kafka-ca.pem")
    assert effective["schema_registry"]["client"]["basic.auth.user.info"] == "***"
    assert "replace-me" not in out  # secrets redacted
    assert "OK" in scratch["runs"][1].stderr


def test_the_secret_holds_what_every_kafka_client_reads(scratch):
    """The Secret the README creates has every key the rendered overlay's relay, Jobs and KEDA read, values as
    written in the file, and the CA bundle the overlay mounts."""
    calls = scratch["kubectl"]
    created = [c for c in calls if "create" in c["args"]]
    assert len(created) == 1
    secret = yaml.safe_load(created[0]["output"])
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data["PROCESSOR__KAFKA__CLIENT__SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert data["KEDA_KAFKA_SASL"] == "scram_sha512" and data["KEDA_KAFKA_TLS"] == "enable"
    (patch,) = [c for c in calls if "patch" in c["args"]]
    body = json.loads(patch["args"][patch["args"].index("-p") + 1])
    assert base64.b64decode(body["data"]["kafka-ca.crt"]).decode() == CA_PEM
    keys = set(data) | set(body["data"])
    assert secret["metadata"]["name"] == "event-relay-credentials"

    rendered = subprocess.run([tool("kubectl"), "kustomize", str(scratch["repo"] / "deploy/k8s/overlays/prod")],
                              capture_output=True, text=True, timeout=120, check=True).stdout
    objs = [o for o in yaml.safe_load_all(rendered) if o]
    auth = next(o for o in objs if o["kind"] == "TriggerAuthentication")
    assert {r["key"] for r in auth["spec"]["secretTargetRef"]} <= keys
    deployment = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    mounted = {i["key"] for v in deployment["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert mounted <= keys
    config = next(o for o in objs if o["kind"] == "ConfigMap" and "relay.yaml" in o.get("data", {}))
    assert config["data"]["relay.yaml"] == EXAMPLE_CONFIG.read_text()  # the operator's copy, not the example's
    text = yaml.safe_dump(yaml.safe_load(config["data"]["relay.yaml"]))  # comments left out
    needed = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}", text) if m.group(2) is None}
    assert needed and needed <= keys  # every ${VAR} without a default


def test_the_readmes_loop_takes_each_value_as_written(scratch, tmp_path):
    """The same file feeds the shell and `kubectl --from-env-file`, which takes values literally: so must
    the README's loop (`. file` would expand `$`)."""
    home = tmp_path / "home"
    home.mkdir()
    values = {"PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": "k9${HOSTNAME}q", "A_QUOTED": "'x y' \"z\"",
              "A_DOLLAR": "z${NOT_SET}z$(echo no)"}
    (home / "relay-credentials.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    script = f"{LOOP}\n{sys.executable} -c 'import json, os; print(json.dumps(dict(os.environ)))'"
    done = subprocess.run(["bash", "-e", "-c", script], env={**scratch["env"], "HOME": str(home)},
                          capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(done.stdout)
    assert {k: seen[k] for k in values} == values
