"""The fault suite's verdicts: what fails a fault, when ingest is counted as resumed, and which
e-mails count as a fever's first page. Pure: figures and headers in, verdicts out."""

from __future__ import annotations

from email.parser import Parser

from tests.fault_checks import Mail
from tests.fault_suite import failures, resume_ns

PASSING = {
    "fault": "sigkill",
    "answered": 1200,
    "lost": 0,
    "lost_kafka": 0,
    "unanswered": 0,
    "fever_pages": 1,
    "fever_alerts": 1,
    "marker_pages": 1,
}


def test_a_clean_fault_passes() -> None:
    """Everything answered, stored, in Kafka, and one page and one alert: no reason to fail."""
    assert failures(PASSING) == []


def test_each_loss_or_page_count_fails_the_fault() -> None:
    """A lost reading (database or Kafka), an unanswered one, or a fever paged zero or two
    times, or a missing marker page, each fails the fault and is named."""
    cases = {
        "lost": 1,
        "lost_kafka": 1,
        "unanswered": 1,
        "fever_pages": 0,
        "fever_alerts": 2,
        "marker_pages": 0,
    }
    for name, value in cases.items():
        reasons = failures(PASSING | {name: value})
        assert len(reasons) == 1 and name in reasons[0], (name, reasons)
    assert failures(PASSING | {"fever_pages": 2}) == ["fever_pages=2"]
    assert failures(PASSING | {"answered": 0}) == ["nothing answered"]
    assert failures({"fault": "kafka-sigkill", "error": "StackError: x"}) == ["StackError: x"]


def test_resume_is_the_first_answer_to_a_reading_published_after_the_fault() -> None:
    """Readings published before the fault, or in the half second after it (they may have
    slipped through before it took effect), do not show the pipeline answering again."""
    s = 1_000_000_000
    published = {"before": 1 * s, "slipped": 3 * s + s // 10, "after": 4 * s, "later": 5 * s}
    answered = {"before": 2 * s, "slipped": 3 * s + s // 5, "after": 12 * s, "later": 11 * s}
    assert resume_ns(published, answered, fault_at=3 * s) == 11 * s
    assert resume_ns(published, {"before": 2 * s}, fault_at=3 * s) is None


def mail(headers: str) -> Mail:
    return Mail("x.eml", Parser().parsestr(headers + "\n\nbody"))


def test_first_page_excludes_repeats_all_clears_and_other_patients() -> None:
    """A first page names the patient and is neither a repeat nor an all clear."""
    first = mail("Subject: [VIGIL HIGH] Fever 38.9 C — patient P-fever-abc")
    repeat = mail(
        "Subject: [VIGIL HIGH] Repeat 1 of 3: Fever — patient P-fever-abc\nX-Vigil-Repeat: 1"
    )
    clear = mail("Subject: [VIGIL ALL CLEAR] Fever — patient P-fever-abc\nX-Vigil-All-Clear: yes")
    other = mail("Subject: [VIGIL HIGH] Fever 38.9 C — patient P-marker-abc")
    assert first.first_page_about("P-fever-abc")
    assert not repeat.first_page_about("P-fever-abc")
    assert not clear.first_page_about("P-fever-abc")
    assert not other.first_page_about("P-fever-abc")
