from processor.logs import where_failed


def test_a_failure_is_described_by_type_and_place_never_its_message():
    def plan(record):
        return record["jane.doe@example.com"]

    try:
        plan({})
    except KeyError as exc:
        text = where_failed(exc)
    assert text.startswith("KeyError at ") and text.endswith(" in plan")
    assert "jane" not in text and "example.com" not in text
    assert where_failed(ValueError("x")) == "ValueError"
