"""The pipeline's outages in the care-team API, over real HTTP and PostgreSQL: any signed-in
member of a care team reads them (they are the whole pipeline's and name no patient), newest
first with ids as text; nobody reads them without a token; ``since`` must carry an offset and
``limit`` stays within 1-500."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.conftest import World, bearer

pytestmark = pytest.mark.stack

PATH = "/api/pipeline-outages"
# Far ahead of any outage another test records, so these two are the newest.
EARLIER = datetime(2099, 1, 1, 3, 0, tzinfo=UTC)
LATER = datetime(2099, 1, 2, 3, 0, tzinfo=UTC)


@pytest.fixture
async def outages(api_world: World, pg_dsn: str) -> AsyncIterator[dict[str, Any]]:
    """Two outages of one heartbeat source: an earlier one that ended after 20 minutes, its
    care teams told, and a later one still going on."""
    source = f"heartbeat-{api_world.run}-{uuid.uuid4().hex[:6]}"
    ended, ongoing = uuid.uuid4(), uuid.uuid4()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            """
            INSERT INTO pipeline_outages (outage_id, source, started_at, ended_at, detected_at,
                                          recovered_at, summarised_at)
            VALUES ($1, $3, $4::timestamptz, $4::timestamptz + interval '20 minutes',
                    $4::timestamptz + interval '2 minutes', $4::timestamptz + interval '21 minutes',
                    $4::timestamptz + interval '25 minutes'),
                   ($2, $3, $5::timestamptz, NULL, $5::timestamptz + interval '2 minutes', NULL,
                    NULL)
            """,
            ended,
            ongoing,
            source,
            EARLIER,
            LATER,
        )
        yield {"source": source, "ended": str(ended), "ongoing": str(ongoing)}
    finally:
        await conn.execute("DELETE FROM pipeline_outages WHERE source = $1", source)
        await conn.close()


async def test_any_member_reads_the_outages_newest_first(
    api_world: World, outages: dict[str, Any]
) -> None:
    async with httpx.AsyncClient(base_url=api_world.base_url) as client:
        assert (await client.get(PATH)).status_code == 401
        for label in ("clinician_a", "auditor_a", "clinician_b"):
            headers = bearer(await api_world.token(label))
            response = await client.get(PATH, params={"limit": 2}, headers=headers)
            assert response.status_code == 200, (label, response.text)
            assert [o["outage_id"] for o in response.json()] == [
                outages["ongoing"],
                outages["ended"],
            ], label
        [ongoing, ended] = response.json()
    assert ongoing["source"] == ended["source"] == outages["source"]
    assert ongoing["ended_at"] is None and ongoing["summarised_at"] is None
    assert datetime.fromisoformat(ended["started_at"]) == EARLIER
    assert datetime.fromisoformat(ended["ended_at"]) == EARLIER + timedelta(minutes=20)
    assert datetime.fromisoformat(ended["summarised_at"]) == EARLIER + timedelta(minutes=25)
    assert ended["teams_told"] == 0


async def test_since_leaves_out_what_ended_before_and_needs_an_offset(
    api_world: World, outages: dict[str, Any]
) -> None:
    headers = bearer(await api_world.token("clinician_a"))
    async with httpx.AsyncClient(base_url=api_world.base_url, headers=headers) as client:
        after_the_first = (EARLIER + timedelta(hours=1)).isoformat()
        response = await client.get(PATH, params={"since": after_the_first, "limit": 500})
        assert response.status_code == 200, response.text
        ids = {o["outage_id"] for o in response.json()}
        assert outages["ongoing"] in ids and outages["ended"] not in ids
        naive = await client.get(PATH, params={"since": "2099-01-01T04:00:00"})
        assert naive.status_code == 422
        for limit in (0, 501):
            assert (await client.get(PATH, params={"limit": limit})).status_code == 422
