"""The Dockerfile, parsed: multi-stage, non-root, no build tools at run time, health-checked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|build-essential|clang|make|cmake|python3?-dev)\b")


@dataclass
class Instruction:
    """One Dockerfile instruction with its argument text (continuations joined)."""

    keyword: str
    args: str


@dataclass
class Stage:
    """A build stage: its FROM line and its instructions."""

    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        """Arguments of every instruction of that keyword in this stage."""
        return [i.args for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Split a Dockerfile into global instructions and stages."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    preamble: list[Instruction] = []
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip())
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            assert match, line
            stages.append(Stage(match.group(1), match.group(2)))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            preamble.append(instruction)
    return preamble, stages


@pytest.fixture(scope="module")
def parsed() -> tuple[list[Instruction], list[Stage]]:
    """The parsed Dockerfile."""
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(parsed: tuple[list[Instruction], list[Stage]]) -> Stage:
    """The last (runtime) stage."""
    return parsed[1][-1]


def resolve(image: str, preamble: list[Instruction]) -> str:
    """Substitute global ARG defaults into an image reference."""
    defaults = dict(
        arg.split("=", 1) for i in preamble if i.keyword == "ARG" for arg in [i.args] if "=" in arg
    )
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)


def exec_form(args: str) -> list[str]:
    """An instruction's JSON (exec) form as a list."""
    value = json.loads(args)
    assert isinstance(value, list), args
    return value


def test_multi_stage_on_python_311_slim(parsed: tuple[list[Instruction], list[Stage]]) -> None:
    """At least two stages, all on python:3.11-slim, the builder making a wheel."""
    preamble, stages = parsed
    assert len(stages) >= 2
    for stage in stages:
        assert resolve(stage.base, preamble) == "python:3.11-slim"
    builder = stages[0]
    assert any("pip wheel" in run for run in builder.all("RUN"))


def test_final_stage_installs_only_the_wheel(final: Stage) -> None:
    """The runtime stage copies wheels from the builder, not the source tree, and installs them."""
    copies = final.all("COPY")
    assert copies, "the runtime stage copies nothing"
    assert all(c.startswith("--from=") for c in copies), copies
    install = " ".join(final.all("RUN"))
    assert "pip install" in install
    assert "--no-index" in install


def test_final_stage_has_no_build_tools(final: Stage) -> None:
    """No compiler or build-essential is installed in the runtime stage."""
    for run in final.all("RUN"):
        assert not BUILD_TOOLS.search(run), run


def test_final_stage_runs_as_non_root(final: Stage) -> None:
    """The runtime stage ends on a non-root USER, numeric or created in that stage."""
    users = final.all("USER")
    assert users, "no USER in the runtime stage"
    user = users[-1].split(":")[0]
    arg = re.fullmatch(r"\$\{?(\w+)\}?", user)
    if arg:  # an ARG of the stage: judge its default
        (default,) = [a.split("=", 1)[1] for a in final.all("ARG") if a.startswith(f"{arg[1]}=")]
        user = default
    assert user not in {"root", "0"}
    if not user.isdigit():
        runs = " ".join(final.all("RUN"))
        assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), user


def test_entrypoint_is_llm_worker_run(final: Stage) -> None:
    """ENTRYPOINT is llm-worker and the default command is run; port 9464 is exposed."""
    assert exec_form(final.all("ENTRYPOINT")[-1]) == ["llm-worker"]
    assert exec_form(final.all("CMD")[-1]) == ["run"]
    assert "9464" in " ".join(final.all("EXPOSE")).split()


def test_healthcheck_requests_healthz(final: Stage) -> None:
    """HEALTHCHECK requests 127.0.0.1:9464/healthz with python's urllib (no curl in slim)."""
    (check,) = final.all("HEALTHCHECK")
    assert "CMD" in check
    command = check[check.index("CMD") + 3 :].strip()
    words = exec_form(command)
    assert words[0] == "python"
    script = " ".join(words)
    assert "urllib.request" in script
    assert "/healthz" in script
    assert "127.0.0.1" in script
    assert "9464" in script


def test_dockerignore_keeps_the_build_inputs() -> None:
    """.dockerignore drops the venv, git and caches but keeps what the wheel build needs."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for excluded in (".venv", "**/.git", "**/__pycache__"):
        assert excluded in patterns
    for needed in ("pyproject.toml", "README.md", "worker"):
        assert needed not in patterns
        assert not any(p.rstrip("/") == needed for p in patterns)
