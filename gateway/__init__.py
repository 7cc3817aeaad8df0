"""The gateway: dvd-serve's OpenAI-compatible HTTP front door.

One module per concept: `config` (GatewayConfig), `cli` (`dvd gateway`), `app` (create_app:
routes and lifespan state), `middleware` (request id, body limit, access log), `protocol`
(OpenAI pydantic models), `convert` (request -> GenerateRequest), `images` (image URLs ->
checked bytes), `backends` (language-server pool: routing, retries, Info, Health), `serving`
(one chat completion: JSON or SSE), `errors` (OpenAI error shape, one mapping), `metrics`
(Prometheus, per-app registry).
"""
