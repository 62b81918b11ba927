"""Protocol conformance, part 3: the documented codes, fields and schema equal the code's.

docs/client.md is the contract for clients in other languages. These tests derive each list from
the code (the `ErrorCode` and `RejectionCode` enums, every place the daemon writes a code, the
ledger's `Rejected` calls, the `Welcome` struct, `seqd schema`) and compare it with the doc.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from daemon.harness import write_config
from sequencer.apps.ledger import LEDGER_SCHEMA
from sequencer.client.protocol import ErrorCode, RejectionCode, Welcome
from tests import raw_wire as wire
from tests.node_fixtures import node_factory  # noqa: F401 (fixture)

ROOT = wire.ROOT
# The places a code is written for the wire: the call's code argument (position, keyword).
CODE_CALLS = {"ProtocolError": 0, "Error": 0, "_fail": 1, "fail": 1, "encode_rejection": 0}
WIRE_CODES = {code.value for code in ErrorCode} | {code.value for code in RejectionCode}


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _codes_written(path: Path) -> list[tuple[int, str]]:
    """(line, code) for every code literal or enum member the module writes to the wire: the code
    argument of ProtocolError/Error/_fail/fail/encode_rejection, and the "code" value of a dict."""
    found: list[tuple[int, str]] = []

    def take(expression: ast.expr | None) -> None:
        if isinstance(expression, ast.Constant) and isinstance(expression.value, str):
            found.append((expression.lineno, expression.value))
        elif isinstance(expression, ast.Attribute) and isinstance(expression.value, ast.Attribute | ast.Name):
            owner = expression.value.attr if isinstance(expression.value, ast.Attribute) else expression.value.id
            if owner in ("ErrorCode", "RejectionCode"):
                enum = ErrorCode if owner == "ErrorCode" else RejectionCode
                found.append((expression.lineno, enum[expression.attr].value))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and _call_name(node) in CODE_CALLS:
            position = CODE_CALLS[_call_name(node)]
            if len(node.args) > position:
                take(node.args[position])
            take(next((keyword.value for keyword in node.keywords if keyword.arg == "code"), None))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "code":
                    take(value)
    return sorted(found)


def test_error_codes_documented_are_exactly_the_codes_the_daemon_can_send() -> None:
    assert wire.doc_codes(wire.ERROR_CODES_HEADING) == [code.value for code in ErrorCode]


def test_seqd_rejection_codes_documented_are_exactly_the_codes_seqd_can_give() -> None:
    assert wire.doc_codes(wire.SEQD_REJECTION_CODES_HEADING) == [code.value for code in RejectionCode]


def test_daemon_and_codec_write_no_code_outside_the_documented_enums() -> None:
    """Any code written for a peer is an enum member (or its literal value), so the two tests
    above cover it. LocalProtocolError codes are never sent and are not scanned."""
    modules = sorted((ROOT / "daemon").rglob("*.py")) + [
        path for path in sorted((ROOT / "sequencer").rglob("*.py")) if "apps" not in path.parts
    ]
    scanned = {path.relative_to(ROOT).as_posix(): _codes_written(path) for path in modules}
    assert scanned["daemon/roles/sequencer.py"], "the scan found no code in the sequencer role"
    assert scanned["sequencer/gateway/core.py"], "the scan found no code in the gateway core"
    assert scanned["sequencer/client/connection.py"], "the scan found no code in the codec"
    unknown = [
        f"{module}:{line}: {code!r}" for module, codes in scanned.items() for line, code in codes if code not in WIRE_CODES
    ]
    assert not unknown, "codes written to the wire but not in ErrorCode/RejectionCode (and docs/client.md):\n" + "\n".join(unknown)


def test_scan_finds_an_undocumented_code_literal(tmp_path: Path) -> None:
    """The scan above is not vacuous: each way of writing a code is seen."""
    module = tmp_path / "bad.py"
    module.write_text(
        "raise ProtocolError('made_up_1', 'x')\n"
        "self._fail(session, 'made_up_2', 'x')\n"
        "Error(code='made_up_3', message='x')\n"
        "encode({'code': 'made_up_4', 'message': 'x'})\n"
        "encode_rejection(protocol.RejectionCode.BAD_COMMAND, 'x')\n"
        "gateway.fail(session, 'made_up_5', 'x')\n"
    )
    assert [code for _line, code in _codes_written(module)] == [
        "made_up_1", "made_up_2", "made_up_3", "made_up_4", "bad_command", "made_up_5"
    ]  # fmt: skip


def test_ledger_rejection_codes_documented_are_exactly_the_codes_the_ledger_raises() -> None:
    path = ROOT / "sequencer" / "apps" / "ledger.py"
    raised = {
        node.args[0].value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and _call_name(node) == "Rejected"
        and node.args and isinstance(node.args[0], ast.Constant)
    }  # fmt: skip
    documented = wire.doc_codes(wire.LEDGER_REJECTION_CODES_HEADING)
    assert len(documented) == len(set(documented))
    assert set(documented) == raised


def test_welcome_fields_documented_are_exactly_the_welcome_struct() -> None:
    documented = wire.doc_codes(wire.WELCOME_FIELDS_ANCHOR)
    assert len(documented) == len(set(documented))
    assert set(documented) == set(Welcome.__struct_fields__)


# -- seqd schema -------------------------------------------------------------------------------


def _seqd_schema(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", "schema", *arguments],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def _published(*arguments: str) -> dict[str, Any]:
    result = _seqd_schema(*arguments)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def _union_mapping(union: dict[str, Any]) -> dict[str, str]:
    """The tag -> $ref mapping of a published union (replies are nested: they may be nil)."""
    if "discriminator" in union:
        mapping: dict[str, str] = union["discriminator"]["mapping"]
        return mapping
    (tagged,) = [member for member in union["anyOf"] if "discriminator" in member]
    return _union_mapping(tagged)


def test_seqd_schema_publishes_every_ledger_type_with_its_fields_kind_and_version() -> None:
    document = _published()
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["x-seqd-app-class"] == "sequencer.apps.ledger:Ledger"
    assert document["x-seqd-version"] == LEDGER_SCHEMA.version
    definitions = document["$defs"]
    for kind, union, types in (
        ("command", "commands", LEDGER_SCHEMA.commands),
        ("reply", "replies", LEDGER_SCHEMA.replies),
        ("event", "events", LEDGER_SCHEMA.events),
    ):
        names = [cls.__name__ for cls in types]
        assert _union_mapping(document[union]) == {name: f"#/$defs/{name}" for name in names}
        for cls in types:
            published = definitions[cls.__name__]
            assert published["x-seqd-kind"] == kind
            assert published["x-seqd-version"] == LEDGER_SCHEMA.version
            info = msgspec.inspect.type_info(cls)
            assert isinstance(info, msgspec.inspect.StructType)
            fields = {field.encode_name for field in info.fields}
            assert set(published["properties"]) == fields | {"type"}
            assert published["properties"]["type"] == {"enum": [cls.__name__]}
            assert set(published["required"]) == {f.encode_name for f in info.fields if f.required} | {"type"}


def test_seqd_schema_app_option_and_config_name_another_app_and_its_version(tmp_path: Path) -> None:
    by_option = _published("--app", "tests.fixtures.tally_v2:Tally")
    assert by_option["x-seqd-version"] == 2
    assert {name for name, definition in by_option["$defs"].items() if definition.get("x-seqd-kind") == "command"} == {
        "Add", "Remove"
    }  # fmt: skip
    config = write_config(tmp_path / "seqd.toml", {"node": {"name": "x", "app": "tests.fixtures.tally_v2:Tally"}})
    assert _published("--config", str(config)) == by_option


def test_seqd_schema_of_an_app_that_cannot_load_says_why_and_exits_2() -> None:
    result = _seqd_schema("--app", "no.such.module:App")
    assert result.returncode == 2
    assert "no.such.module" in result.stderr
    assert "Traceback" not in result.stderr


_JSON_TYPES = {"integer": int, "string": str, "boolean": bool, "null": type(None)}


def _example(definition: dict[str, Any]) -> dict[str, Any]:
    """A command built from its published schema alone: every required field, a simple value of
    its JSON type."""
    values = {"integer": 1, "string": "a", "boolean": False}
    command: dict[str, Any] = {}
    for name in definition["required"]:
        prop = definition["properties"][name]
        command[name] = prop["enum"][0] if "enum" in prop else values[prop["type"]]
    return command


def _conforms(value: Any, definition: dict[str, Any]) -> bool:
    if not isinstance(value, dict) or not set(definition["required"]) <= set(value):
        return False
    for name, item in value.items():
        prop = definition["properties"].get(name)
        if prop is None:
            return False
        if "enum" in prop:
            if item not in prop["enum"]:
                return False
        elif not isinstance(item, _JSON_TYPES[prop["type"]]) or isinstance(item, bool) != (prop["type"] == "boolean"):
            return False
    return True


def test_commands_built_from_the_published_schema_alone_are_decoded_and_replies_conform(node_factory) -> None:  # noqa: F811
    """What a client in another language does: read `seqd schema`, build msgpack maps, send them
    in raw frames, and check replies and events against the same schema."""
    document = _published()
    definitions = document["$defs"]
    replies = _union_mapping(document["replies"])
    events = _union_mapping(document["events"])
    commands = list(_union_mapping(document["commands"]))  # in declaration order
    assert all(definitions[name]["x-seqd-kind"] == "command" for name in commands)
    assert len(commands) == len(LEDGER_SCHEMA.commands)
    node = node_factory()
    with wire.Raw(node.socket_path) as raw:
        raw.open(client_id=31, subscribe_events=True)
        for request_id, name in enumerate(commands, start=1):
            version = definitions[name]["x-seqd-version"]
            payload = msgspec.msgpack.encode(_example(definitions[name]))
            raw.send(wire.command(request_id, payload, request_id - 1, version))
            (reply,) = raw.replies(1)
            if reply.fields["status"] == wire.REJECTED:
                # Decoded, and refused by the ledger for its content (a documented ledger code).
                assert wire.rejection(reply) in wire.doc_codes(wire.LEDGER_REJECTION_CODES_HEADING), name
            else:
                body = reply.app()
                assert reply.fields["version"] == document["x-seqd-version"]
                assert body["type"] in replies and _conforms(body, definitions[body["type"]]), (name, body)
        assert raw.events, "no event from any command (OpenAccount then Deposit should publish one)"
        for event in raw.events:
            body = event.app()
            assert body["type"] in events and _conforms(body, definitions[body["type"]]), body


def test_raw_conformance_suite_does_not_load_the_project_client() -> None:
    """Parts 1 and 2 check the daemon against the docs, not against `sequencer.client`.

    The suite's own modules import nothing of `sequencer.client` (checked on their source), and
    loading them loads no client library module. The wire codec may be loaded indirectly: the
    daemon's code that the harness imports uses it for its frame limits.
    """
    raw_suite = ("tests/test_conformance.py", "tests/test_conformance_sessions.py", "tests/raw_wire.py")
    for path in raw_suite:
        tree = ast.parse((ROOT / path).read_text(), path)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(name.startswith("sequencer.client") for name in names), (path, names)
    script = (
        "import sys, tests.test_conformance, tests.test_conformance_sessions\n"
        "print([name for name in sys.modules if name.startswith('sequencer.client')])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    loaded = set(ast.literal_eval(result.stdout.strip()))
    codec = {"sequencer.client.protocol", "sequencer.client.wire", "sequencer.client.frames", "sequencer.client.connection"}
    assert loaded <= {"sequencer.client", "sequencer.client.errors", *codec}, loaded
