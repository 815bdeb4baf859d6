"""OAUTHBEARER tokens for AWS MSK IAM authentication (``pip install 'eventpulse[msk]'``).

    EVENTPULSE_KAFKA_SECURITY_PROTOCOL=SASL_SSL
    EVENTPULSE_KAFKA_SASL_MECHANISM=OAUTHBEARER
    EVENTPULSE_KAFKA_OAUTH_TOKEN_PROVIDER=eventpulse.logging.msk:MSKIAMTokenProvider
    AWS_REGION=eu-west-1            # and the usual AWS credentials chain (role, env, profile)

The token is a SigV4-presigned request made by AWS's ``aws-msk-iam-sasl-signer-python`` from the
process's AWS credentials. Wired only: not tested against MSK here (no AWS from these machines).
"""

from __future__ import annotations

import asyncio
import os

from aiokafka.abc import AbstractTokenProvider


class MSKIAMTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(self, region: str | None = None) -> None:
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not self.region:
            raise ValueError("MSK IAM needs the cluster's region: set AWS_REGION")
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider  # the optional extra

        self._signer = MSKAuthTokenProvider

    async def token(self) -> str:
        # signing reads credentials (maybe from the instance metadata service): not on the loop
        token, _expiry_ms = await asyncio.to_thread(self._signer.generate_auth_token, self.region)
        return str(token)
