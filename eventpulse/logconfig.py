"""Worker logging: JSON lines (python-json-logger) for log shippers, or readable text."""

from __future__ import annotations

import logging.config
from typing import Any

_TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_JSON = "%(asctime)s %(levelname)s %(name)s %(message)s"


def logging_dict(fmt: str = "text", level: str = "INFO") -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": "pythonjsonlogger.json.JsonFormatter", "format": _JSON,
         "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"}}
        if fmt == "json" else {"format": _TEXT}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "main",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        # aiokafka and Faust are chatty at INFO about every (re)connection; botocore's DEBUG
        # dumps every S3 request with its signed headers (the access key id in them): never
        "loggers": {"aiokafka": {"level": "WARNING"}, "faust": {"level": "WARNING"},
                    "mode": {"level": "WARNING"},
                    **{name: {"level": _at_least_info(level)}
                       for name in ("botocore", "boto3", "s3transfer")}},
    }


def _at_least_info(level: str) -> str:
    number = logging.getLevelName(level.upper())
    return "INFO" if isinstance(number, int) and number < logging.INFO else level


def configure(fmt: str = "text", level: str = "INFO") -> None:
    logging.config.dictConfig(logging_dict(fmt, level))
