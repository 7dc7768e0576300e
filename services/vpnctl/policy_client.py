"""policyd's PolicyService through the generated stub (see :mod:`vpnr.vpnctl.service_client`),
with the paging every List call shares."""

from __future__ import annotations

from vpnr.v1 import policy_pb2_grpc
from vpnr.vpnctl.service_client import ServiceClient


class PolicyClient(ServiceClient):
    """One connection to policyd; every call carries the same deadline."""

    daemon = "policyd"
    stub_class = policy_pb2_grpc.PolicyServiceStub
