"""The login throttles (pure) and how the server treats forwarded headers."""

from __future__ import annotations

from services.api.app import server_options
from services.api.domain.throttle import LoginThrottles
from services.api.settings import ApiSettings


def test_a_guesser_waits_and_the_owner_elsewhere_does_not() -> None:
    t = LoginThrottles(max_failures=5, window_s=60)
    for n in range(5):
        assert t.retry_after("Nurse", "10.0.0.9", 100.0 + n) == 0
        t.failed("Nurse", "10.0.0.9", 100.0 + n)
    assert t.retry_after("nurse", "10.0.0.9", 105.0) == 55.0  # usernames match case-blind
    assert t.retry_after("nurse", "10.0.0.1", 105.0) == 0
    assert t.retry_after("nurse", "10.0.0.9", 160.0) == 0  # the window has passed


def test_many_places_guessing_one_account_are_bounded_too() -> None:
    t = LoginThrottles(max_failures=5, window_s=60)
    for n in range(49):
        t.failed("nurse", f"10.0.1.{n}", 100.0)
    assert t.retry_after("nurse", "10.9.9.9", 101.0) == 0
    t.failed("nurse", "10.0.1.200", 100.0)  # the 50th
    assert t.retry_after("nurse", "10.9.9.9", 101.0) > 0


def test_one_place_trying_many_accounts_is_bounded() -> None:
    t = LoginThrottles(max_failures=5, window_s=60)
    for n in range(50):
        t.failed(f"user-{n}", "10.0.2.1", 100.0)
    assert t.retry_after("someone-else", "10.0.2.1", 101.0) > 0
    assert t.retry_after("someone-else", "10.0.2.2", 101.0) == 0


def test_a_success_clears_only_its_own_place() -> None:
    t = LoginThrottles(max_failures=2, window_s=60)
    t.failed("nurse", "a", 1.0)
    t.failed("nurse", "b", 1.0)
    t.failed("nurse", "b", 1.0)
    t.succeeded("nurse", "a")
    assert t.retry_after("nurse", "b", 2.0) > 0


def test_forwarded_headers_are_believed_only_from_configured_proxies() -> None:
    assert server_options(ApiSettings()) == {"proxy_headers": False, "forwarded_allow_ips": ""}
    assert server_options(ApiSettings(trusted_proxies="10.0.0.5, 10.0.0.6")) == {
        "proxy_headers": True,
        "forwarded_allow_ips": "10.0.0.5, 10.0.0.6",
    }
