"""A vpnr.v1 client or server built from one stub set (tests/skew/stubsets.py).

Run as ``python peer.py STUB_DIR client PLAN.json`` or ``python peer.py STUB_DIR serve
SPEC.json``; it never imports ``vpnr`` (see stubsets.py for why), only
``skewstubs.vpnr.v1`` from STUB_DIR.

client: makes each call of the plan (socket, module, service, method, request as a JSON
dict) and prints one JSON line with, per call, the reply as a dict, the field names the
stubs know for the reply type and the numbers of the fields they did not know (top level,
and by the path of each singular sub-message holding some).

serve: serves ``service`` on ``socket`` with the generated servicer base class of the set,
overriding the methods in ``replies`` that the set defines (an RPC the set lacks is simply
not there, as on an older daemon); each request is appended to ``log`` as a JSON
line. Prints READY once serving and stops on SIGTERM.
"""

from __future__ import annotations

import importlib
import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet


def _modules(stub_dir: str, module: str) -> tuple[Any, Any]:
    sys.path.insert(0, stub_dir)
    pb2 = importlib.import_module(f"skewstubs.vpnr.v1.{module}_pb2")
    grpc_mod = importlib.import_module(f"skewstubs.vpnr.v1.{module}_pb2_grpc")
    return pb2, grpc_mod


def unknown_by_path(message: Message, path: str = "") -> dict[str, list[int]]:
    """Numbers of the fields these stubs do not know, by the path of the (singular)
    sub-message holding them ("" is the message itself)."""
    found: dict[str, list[int]] = {}
    unknown = UnknownFieldSet(message)
    numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
    if numbers:
        found[path] = numbers
    for field, value in message.ListFields():
        if field.message_type is not None and not field.is_repeated:
            found.update(unknown_by_path(value, f"{path}.{field.name}".lstrip(".")))
    return found


def describe(message: Message) -> dict[str, Any]:
    """What a program built from these stubs sees of ``message``."""
    unknown = unknown_by_path(message)
    return {
        "type": message.DESCRIPTOR.full_name,
        "value": json_format.MessageToDict(message, preserving_proto_field_name=True),
        "known_fields": sorted(message.DESCRIPTOR.fields_by_name),
        "unknown_numbers": unknown.get("", []),
        "unknown_by_path": unknown,
    }


def run_client(stub_dir: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Make each call; the result of each says what came back."""
    results: list[dict[str, Any]] = []
    for call in plan:
        pb2, grpc_mod = _modules(stub_dir, call["module"])
        service = pb2.DESCRIPTOR.services_by_name[call["service"]]
        method = service.methods_by_name.get(call["method"])
        if method is None:
            results.append({"ok": False, "code": "NOT_IN_STUBS"})
            continue
        request = json_format.ParseDict(call.get("request", {}),
                                        getattr(pb2, method.input_type.name)())
        with grpc.insecure_channel(f"unix:{call['socket']}") as channel:
            stub = getattr(grpc_mod, f"{call['service']}Stub")(channel)
            try:
                reply = getattr(stub, call["method"])(request, timeout=20)
            except grpc.RpcError as exc:
                results.append({"ok": False, "code": exc.code().name,
                                "details": exc.details()})
                continue
        results.append({"ok": True, **describe(reply)})
    return results


def run_server(stub_dir: str, spec: dict[str, Any]) -> None:
    """Serve until SIGTERM."""
    pb2, grpc_mod = _modules(stub_dir, spec["module"])
    service = pb2.DESCRIPTOR.services_by_name[spec["service"]]
    log_path = Path(spec["log"])
    lock = threading.Lock()

    def handler(name: str, reply: dict[str, Any]) -> Any:
        output = getattr(pb2, service.methods_by_name[name].output_type.name)

        def answer(self: Any, request: Message, context: grpc.ServicerContext) -> Message:
            with lock, log_path.open("a") as log:
                log.write(json.dumps({"method": name, **describe(request)}) + "\n")
            parsed: Message = json_format.ParseDict(reply, output())
            return parsed

        return answer

    base = getattr(grpc_mod, f"{spec['service']}Servicer")
    servicer = type("SkewPeer", (base,), {name: handler(name, reply)
                                          for name, reply in spec["replies"].items()
                                          if name in service.methods_by_name})()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    getattr(grpc_mod, f"add_{spec['service']}Servicer_to_server")(servicer, server)
    Path(spec["socket"]).parent.mkdir(parents=True, exist_ok=True)
    server.add_insecure_port(f"unix:{spec['socket']}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("READY", flush=True)
    stop.wait(600)  # bounded: a forgotten peer ends by itself
    server.stop(1).wait(5)


def main() -> None:
    """Command line: STUB_DIR client|serve FILE.json."""
    stub_dir, mode, path = sys.argv[1:4]
    document = json.loads(Path(path).read_text())
    if mode == "client":
        print(json.dumps(run_client(stub_dir, document)))
    else:
        run_server(stub_dir, document)


if __name__ == "__main__":
    main()
