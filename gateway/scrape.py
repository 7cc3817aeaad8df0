"""Other processes' metrics in the gateway's /metrics: one scrape sees a whole `dvd up`.

`dvd up` runs three (or more) processes on one machine, each with its own registry; asking
one URL for everything is what a developer, `curl` or a single Prometheus job expects. The
gateway fetches each `--scrape-metrics` URL when it is scraped itself (a short timeout; a
source that does not answer is left out of that scrape and `dvd_gateway_scrape_up{source}`
says so) and appends their series.

The result must stay one valid exposition: each family named once. Several vision replicas
export the same families, so the appended families are merged by name, every sample
labelled `source="<host:port>"` (which process it came from), and a family that the gateway
itself exports, or that two sources export with different types, is kept once (the first).
In Kubernetes each process is scraped on its own port instead (the ServiceMonitor); there
the gateway has no `--scrape-metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.metrics import GatewayMetrics

logger = logging.getLogger("dvd.gateway")

SOURCE_LABEL = "source"


def source_name(url: str) -> str:
    """The `source` label of a URL's series: its host:port."""
    return urlsplit(url).netloc or url


async def fetch_all(
    client: httpx.AsyncClient, urls: Sequence[str], timeout_s: float, metrics: GatewayMetrics
) -> list[tuple[str, str]]:
    """(source, exposition text) of every URL that answered in time, in the URLs' order."""
    texts = await asyncio.gather(*(_fetch(client, url, timeout_s) for url in urls))
    found = []
    for url, text in zip(urls, texts, strict=True):
        metrics.scrape_up.labels(source_name(url)).set(0 if text is None else 1)
        if text is not None:
            found.append((source_name(url), text))
    return found


async def _fetch(client: httpx.AsyncClient, url: str, timeout_s: float) -> str | None:
    try:
        response = await client.get(url, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as error:
        logger.debug("scraping %s failed: %s", url, error)
        return None
    return response.text


def merge(own: bytes, sources: Iterable[tuple[str, str]]) -> bytes:
    """`own` exposition followed by the sources' families, each family named once."""
    taken = {family.name for family in text_string_to_metric_families(own.decode())}
    families: dict[str, Metric] = {}
    for source, text in sources:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as error:  # a broken source must not break the whole scrape
            logger.warning("metrics of %s do not parse: %s", source, error)
            continue
        for family in parsed:
            if family.name in taken:
                continue
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            if merged.type != family.type:
                continue
            merged.samples += [
                sample._replace(labels={**sample.labels, SOURCE_LABEL: source})
                for sample in family.samples
            ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return own + generate_latest(registry)


class _Families(Collector):
    """Already-built families, as a collector generate_latest can render."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families
