"""policyd's PolicyService through the generated stub (see :mod:`vpnr.vpnctl.service_client`),
with the paging every List call shares."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.message import Message

from vpnr.v1 import policy_pb2_grpc
from vpnr.vpnctl.service_client import ServiceClient, follow_pages


class PolicyClient(ServiceClient):
    """One connection to policyd; every call carries the same deadline."""

    daemon = "policyd"
    stub_class = policy_pb2_grpc.PolicyServiceStub

    def list_all(self, method: str, request: Message, reply_type: type[Message],
                 items: str, page_size: int = 0) -> list[Any]:
        """Every item of a paged List call, following ``next_page_token`` to the end."""
        page: Any = cast(Any, request).page  # every List request has one; Message has not
        page.page_size = page_size

        def fetch(token: str) -> Message:
            page.page_token = token
            return self.call(method, request, reply_type)

        return [item for reply in follow_pages(method, fetch) for item in getattr(reply, items)]
