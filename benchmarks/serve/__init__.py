"""`dvd bench serve`: a load generator for any OpenAI-compatible chat completions endpoint.

A run, module by module:

- `config`: `BenchConfig`, the one frozen description of a run (traffic, workload, SLOs).
- `workload`: the requests' contents: seeded random words and noisy-gradient PNG images,
  made once per size before the clock starts.
- `traffic`: when requests are sent: Poisson or constant arrivals, or a fixed concurrency.
- `client`: one streamed chat completion over HTTP/SSE, timed chunk by chunk.
- `record`: `RequestRecord`, what was measured for one request.
- `stats`: percentiles, TPOT, goodput and throughputs (pure functions).
- `runner`: `run_benchmark(config) -> BenchmarkResult`, the function API.
- `report`: the printed table and the JSON file.
- `cli`: the `dvd bench serve` flags.
"""
