"""Alerts: a person must look now (critical: a rollback that could not restore), or should
know (warning: a failed migration that was rolled back).

Sent from the process that hit the problem, as one JSON POST to `alerts.webhook_url`
(a generic webhook, or a Slack incoming webhook with kind: slack). A failed flow also has a
server-side path, a Prefect automation on its Failed event, which the deployments set up:
this client-side alert is the first of the two, not the only one.

Sending never raises: an alert that cannot be delivered is logged at CRITICAL and reported
back as not sent, so the caller can record that too.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from dataops.errors import BadInput
from dataops.redact import redact
from dataops.settings import Settings

log = logging.getLogger("dataops.alerts")

SEVERITIES = ("info", "warning", "critical")


def send_alert(settings: Settings, severity: str, subject: str, body: str, **fields) -> bool:
    """POST the alert; True if the receiver answered 2xx."""
    import httpx

    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}")
    subject, body = redact(subject), redact(body)
    log.log(logging.CRITICAL if severity == "critical" else logging.WARNING, "%s alert: %s: %s",
            severity, subject, body)
    cfg = settings.alerts
    if cfg.kind == "email":
        return _send_email(cfg, severity, subject, body)
    if not cfg.webhook_url:
        log.log(logging.CRITICAL if severity == "critical" else logging.WARNING,
                "no alerts.webhook_url in %s: the %s alert above went to the log only",
                settings.source or "dataops.yaml", severity)
        return False
    if cfg.kind == "slack":
        payload = {"text": f"*[{severity.upper()}] {subject}*\n{body}"}
    else:
        payload = {"source": "dataops", "severity": severity, "subject": subject, "body": body,
                   "sent_at": datetime.now(timezone.utc).isoformat(),
                   **{k: redact(str(v)) if isinstance(v, str) else v for k, v in fields.items()}}
    try:
        response = httpx.post(cfg.webhook_url, json=payload, timeout=cfg.timeout_s)
    except httpx.HTTPError as exc:
        log.critical("could not deliver the %s alert: %s", severity, redact(str(exc)))
        return False
    if not response.is_success:
        log.critical("the alert receiver answered HTTP %d to the %s alert", response.status_code, severity)
        return False
    return True


def _send_email(cfg, severity: str, subject: str, body: str) -> bool:
    """E-mail goes through Prefect's SendgridEmail block, the same one the failure automation uses."""

    try:
        build_notification_block(cfg).notify(body, f"[{severity.upper()}] {subject}")
    except Exception as exc:  # noqa: BLE001 - an alert must never raise
        log.critical("could not deliver the %s alert by e-mail: %s", severity, redact(str(exc)))
        return False
    return True


def build_notification_block(alerts):
    """The Prefect block for the configured channel, or None when alerts are not configured."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SendgridEmail, SlackWebhook

    if alerts is None or not alerts.configured:
        return None
    secret = lambda v: v.get_secret_value() if hasattr(v, "get_secret_value") else v  # noqa: E731
    if alerts.kind == "slack":
        return SlackWebhook(url=secret(alerts.webhook_url))
    if alerts.kind == "webhook":
        return CustomWebhookNotificationBlock(
            name="dataops", url=secret(alerts.webhook_url), method="POST",
            json_data={"subject": "{{subject}}", "text": "{{body}}", "source": "dataops"},
            allow_private_urls=True)
    if alerts.kind == "email":
        return SendgridEmail(api_key=secret(alerts.sendgrid_api_key), sender_email=alerts.email_from,
                             to_emails=list(alerts.email_to))
    raise BadInput(f"alerts.kind {alerts.kind!r} is not supported; use slack, webhook or email")
