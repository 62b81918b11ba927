"""The withdrawals example's external system: the payment service, as an integration gateway
sees it (`sequencer.apps.payment_service` is the service; docs/integration.md the walk-through).

    # integration.toml, for `seqd integration --config integration.toml`
    system = "sequencer.apps.payout_gateway:PaymentService"
    node_config = "/etc/seqd/seqd.toml"          # app = "sequencer.apps.withdrawals:WithdrawalLedger"
    [options]
    base_url = "http://127.0.0.1:8080"
"""

from __future__ import annotations

import http.client
import json
import logging
from typing import Any, ClassVar
from urllib.parse import urlsplit

from sequencer.apps.withdrawals import PayoutAnswer, PayoutCancelRequested, PayoutRequested
from sequencer.integration.gateway import ExternalSystem

__all__ = ["PaymentService"]

log = logging.getLogger("sequencer.integration")

CALL_TIMEOUT_S_DEFAULT = 2.0  # well under the withdrawal's answer timeout: the timer decides after
FINAL_OUTCOMES = frozenset({"paid", "declined", "cancelled"})


class PaymentService(ExternalSystem):
    """Args:
    base_url: the service's "http://host:port".
    timeout_s: each HTTP call's timeout (connect and read).
    """

    request_types: ClassVar[tuple[type[Any], ...]] = (PayoutRequested, PayoutCancelRequested)
    pending_query: ClassVar[str] = "pending_payouts"

    def __init__(self, base_url: str, timeout_s: float = CALL_TIMEOUT_S_DEFAULT) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname or url.port is None:
            raise ValueError(f"base_url={base_url!r}: expected 'http://host:port'")
        self.host = url.hostname
        self.port = url.port
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer. Raises OSError (http.client's errors are OSErrors or
        HTTPException, turned into one) when there is no 200 answer."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {} if data is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            if response.status != 200:
                raise ConnectionError(f"{method} {path}: HTTP {response.status} {payload[:200]!r}")
            return json.loads(payload)
        except http.client.HTTPException as error:
            raise ConnectionError(f"{method} {path}: {error!r}") from error
        finally:
            connection.close()

    def recall(self, keys: list[int]) -> dict[int, Any]:
        found = self._request("GET", "/payouts?keys=" + ",".join(map(str, keys)))["payouts"]
        return {int(key): record for key, record in found.items() if record["outcome"] in FINAL_OUTCOMES}

    def call(self, request: Any) -> Any | None:
        try:
            if isinstance(request, PayoutRequested):
                return self._request("POST", "/payouts", {
                    "key": request.key, "account": request.account, "amount": request.amount,
                    "destination": request.destination})  # fmt: skip
            return self._request("POST", "/payouts/cancel", {"key": request.key})
        except OSError as error:
            log.info("payment service: no answer for key %d (%s); its timer decides", request.key, error)
            return None

    def answer_command(self, request: Any, answer: Any) -> PayoutAnswer:
        return PayoutAnswer(request.key, answer["outcome"], answer.get("reference", ""))
