"""What every process shares at run time, below the adapters: nothing here knows Kafka's
records or the projection's tables.

- ``settings``     all configuration, one typed object read once from the environment.
- ``logs``         JSON (or human) log lines with secrets and personal data redacted (adr/0011).
- ``tracing``      W3C trace context through Kafka on OpenTelemetry's API (adr/0011).
- ``topics``       creates the topics and refuses topics laid out wrongly.
- ``database``     the engine every process opens, and the NOTIFY channel names.
- ``retry``        the one retry policy: capped exponential backoff with jitter.
- ``http_server``  uvicorn with a clean exit status.
- ``collector``    the startup heap moved out of the garbage collector's view.
"""
