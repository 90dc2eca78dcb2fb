"""Real OTLP trace receivers, from the OpenTelemetry protocol's own messages: over gRPC (the
collector's TraceService, ``Receiver``) and over HTTP (``POST /v1/traces`` with a protobuf body,
``HttpReceiver``). Each keeps the spans it is sent, with their service's name. In a test's process,
or on its own for a benchmark: ``python -m tests.otlp PORT [grpc|http]`` (counts spans, prints the
count on SIGTERM)."""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from service.ops.launcher import free_port


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span (``keep``) or only counts them."""

    def __init__(self, port: int | None = None, keep: bool = True, workers: int = 4):
        self.spans: list[dict[str, Any]] = []
        self.count = 0
        self.keep = keep
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = port or free_port()
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    def Export(self, request: Any, context: Any) -> Any:
        self.take(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def take(self, request: Any) -> None:
        """Keep (or count) the spans of one ``ExportTraceServiceRequest``."""
        spans: list[dict[str, Any]] = []
        seen = 0
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for span in ss.spans:
                    seen += 1
                    if self.keep:
                        spans.append(
                            {
                                "service": attrs.get("service.name", ""),
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "attributes": {a.key: a.value for a in span.attributes},
                            }
                        )
        with self._lock:
            self.count += seen
            if self.keep:
                self.spans += spans

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


class HttpReceiver(Receiver):
    """OTLP over HTTP: ``POST /v1/traces``, an ``ExportTraceServiceRequest`` in protobuf."""

    def __init__(self, port: int | None = None, keep: bool = True):
        self.spans = []
        self.count = 0
        self.keep = keep
        self._lock = threading.Lock()
        self.port = port or free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.take(request)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


def main() -> None:
    kind = sys.argv[2] if len(sys.argv) > 2 else "grpc"
    receiver = (HttpReceiver if kind == "http" else Receiver)(int(sys.argv[1]), keep=False)
    receiver.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print("ready", flush=True)
    done.wait()
    receiver.stop()
    print(receiver.count, flush=True)


if __name__ == "__main__":
    main()
