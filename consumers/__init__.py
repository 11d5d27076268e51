"""Consumer services that fan ``sms-events`` out to the sinks (warehouse, CRM, alerting).

Built in a later issue; the package exists so the import rules hold from the start.
"""
