"""What an alert looks like in Slack: Block Kit for bots, plain text for webhooks and logs.

Every piece of text that comes from events or metrics is escaped, so that a host label such as
``<!channel>`` or ``<https://evil|click me>`` shows as text instead of paging a channel.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from eventpulse.alerts.rules import Rule, render
from eventpulse.alerts.state import Kind, Transition

_EMOJI = {
    ("critical", Kind.FIRING): ":rotating_light:",
    ("warning", Kind.FIRING): ":warning:",
    ("info", Kind.FIRING): ":information_source:",
}


#: Slack's limits (Block Kit reference; chat.postMessage ``text``): longer is refused with
#: ``invalid_blocks`` / ``msg_too_long``, so long label values are cut instead.
MAX_HEADER = 150
MAX_SECTION = 3000
MAX_FIELD = 2000
MAX_TEXT = 39_000


def clip(text: str, limit: int) -> str:
    """Cut escaped text to ``limit`` characters, never through an ``&amp;``-style entity."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    amp = cut.rfind("&")
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "\u2026"


def escape(text: str) -> str:
    """Slack's three control characters (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}"


def _threshold(rule: Rule) -> str:
    threshold = getattr(rule, "threshold", None)
    if threshold is not None:
        return f"{rule.op} {_fmt(threshold)}"  # type: ignore[union-attr]
    factor = getattr(rule, "factor", None)
    if factor is not None:
        return f"> {factor:g}x baseline"
    after = getattr(rule, "after", None)
    return f"no data for {after // 1000}s" if after is not None else ""


def _period(t: Transition) -> str:
    if t.silence_ended_ms is not None:
        return (f"since {_when(t.active_since or t.at_ms)} (silenced until "
                f"{_when(t.silence_ended_ms)})")
    if t.kind == Kind.RESOLVED:
        return f"active since {_when(t.active_since)}, resolved {_when(t.at_ms)}"
    return f"since {_when(t.active_since or t.at_ms)}"


def summary_line(rule: Rule, transition: Transition) -> str:
    state = {Kind.FIRING: "firing", Kind.RESOLVED: "resolved", Kind.REMINDER: "still firing"}[
        transition.kind]
    text = render(rule.annotations.summary, rule=rule.name, state=state,
                  labels=transition.labels, value=_fmt(transition.value),
                  threshold=_threshold(rule), note=transition.note or "")
    return escape(text)


def title(rule: Rule, transitions: list[Transition]) -> str:
    kind = transitions[0].kind
    word = {Kind.FIRING: "FIRING", Kind.RESOLVED: "RESOLVED", Kind.REMINDER: "STILL FIRING"}[kind]
    emoji = ":white_check_mark:" if kind == Kind.RESOLVED else _EMOJI.get(
        (rule.severity, Kind.FIRING), ":bell:")
    count = f" ({len(transitions)} alerts)" if len(transitions) > 1 else ""
    return f"{emoji} [{word}] {escape(rule.name)}{count} - {rule.severity}"


def unescape(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def plain_text(rule: Rule, transitions: list[Transition]) -> str:
    """The message as Slack text (escaped); ``unescape`` it for a terminal or log."""
    lines = [title(rule, transitions)]
    for t in transitions:
        labels = ", ".join(f"{escape(k)}={escape(v)}" for k, v in sorted(t.labels.items())
                           if k != "alertname")
        lines.append(
            f"- {summary_line(rule, t)} | value {_fmt(t.value)} "
            f"(threshold {escape(_threshold(rule))}) "
            f"| {labels} | {_period(t)}"
        )
        if t.silenced_until is not None:
            lines.append(f"  silenced until {_when(t.silenced_until)}")
        if t.silence_ended_ms is not None:
            lines.append(f"  was silenced; the silence ended {_when(t.silence_ended_ms)}")
    return clip("\n".join(lines), MAX_TEXT)


def blocks(rule: Rule, transitions: list[Transition]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"type": "header",
         "text": {"type": "plain_text", "text": clip(title(rule, transitions), MAX_HEADER)}},
    ]
    for t in transitions[:20]:
        labels = "\n".join(f"*{escape(k)}*: `{escape(v)}`" for k, v in sorted(t.labels.items())
                           if k != "alertname")
        out.append({"type": "section",
                    "text": {"type": "mrkdwn", "text": clip(summary_line(rule, t) or "-", MAX_SECTION)},
                    "fields": [
                        {"type": "mrkdwn", "text": f"*Severity*\n{rule.severity}"},
                        {"type": "mrkdwn",
                         "text": f"*Value*\n{_fmt(t.value)} (threshold {escape(_threshold(rule))})"},
                        {"type": "mrkdwn", "text": f"*When*\n{_period(t)}"},
                        {"type": "mrkdwn", "text": clip(f"*Labels*\n{labels or '-'}", MAX_FIELD)},
                    ]})
    if len(transitions) > 20:
        out.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"and {len(transitions) - 20} more"}]})
    description = rule.annotations.description
    if description:
        out.append({"type": "section", "text": {"type": "mrkdwn", "text": clip(escape(render(
            description, rule=rule.name, labels=transitions[0].labels,
            value=_fmt(transitions[0].value), threshold=_threshold(rule), state="",
            note=transitions[0].note or "")), MAX_SECTION)}})
    links = [(label, url) for label, url in (("Runbook", rule.annotations.runbook_url),
                                             ("Dashboard", rule.annotations.dashboard_url)) if url]
    if links:
        out.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": " | ".join(f"<{escape(u)}|{label}>" for label, u in links)}]})
    return out
