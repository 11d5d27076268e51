"""Consumer services that fan ``sms-events`` out to the sinks (warehouse, CRM, alerting).

``runner`` holds the batch loop every sink shares; ``sinks/`` one module per sink, registered
in ``consumers.sinks.SINKS``; ``python -m consumers <sink>`` runs one of them.
"""
