"""A real DNS server on loopback whose records a test or benchmark changes while servers run.

It answers A queries over UDP from a name -> addresses table (dnspython builds and parses
the messages), so a language server or gateway started with `--dns-server` resolves
"vision.test" exactly as it would resolve a headless Service through cluster DNS: with
real queries, and whatever the table says at that moment. It binds 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self._records: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self.queries = 0

    @property
    def address(self) -> str:
        host, port = self._socket.getsockname()
        return f"{host}:{port}"

    def set(self, name: str, addresses: list[str]) -> None:
        """What `name` resolves to from now on ([] answers NXDOMAIN)."""
        with self._lock:
            self._records[name.rstrip(".").lower()] = list(addresses)

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # not DNS: ignore it, as a real server would
                continue
            self._socket.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        self.queries += 1
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        with self._lock:
            addresses = self._records.get(name)
        if not addresses:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            # TTL 1: nothing between us and the resolver should hold on to old answers
            response.answer.append(dns.rrset.from_text_list(question.name, 1, "IN", "A", addresses))
        return response
