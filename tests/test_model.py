"""Pure unit tests of the key model: state machine table, periods, names, specs (no HSM, no store)."""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keyledger as kl
from keyledger import model
from keyledger.model import (
    ALLOWED_USES,
    TRANSITIONS,
    KeyState,
    Purpose,
    Use,
    check_use,
    next_state,
    parse_period,
    parse_purpose,
    parse_spec,
    validate_name,
)

S = KeyState
ACTIONS = sorted({action for action, _ in TRANSITIONS})


# -- the transition table ----------------------------------------------------------------------
def test_every_state_appears_in_the_transition_table():
    sources = {state for _, state in TRANSITIONS}
    targets = {t for t in TRANSITIONS.values() if t is not None}
    for state in KeyState:
        assert state in sources | targets, f"{state} is unreachable and has no way out"


def test_every_state_has_an_allowed_uses_entry():
    assert set(ALLOWED_USES) == set(KeyState)


def test_destroyed_is_terminal():
    assert [a for (a, s) in TRANSITIONS if s is S.DESTROYED] == []
    for action in ACTIONS:
        with pytest.raises(kl.KeyStateError, match="destroyed"):
            next_state(action, S.DESTROYED, "k")


def test_only_destroy_from_pending_deletion_reaches_destroyed():
    into = [(a, s) for (a, s), t in TRANSITIONS.items() if t is S.DESTROYED]
    assert into == [("destroy", S.PENDING_DELETION)]


def test_every_live_state_can_reach_destroyed():
    """Nothing can get stuck: from any non-destroyed state a path to destroyed exists."""
    for start in KeyState:
        if start is S.DESTROYED:
            continue
        seen, todo = {start}, deque([start])
        while todo:
            cur = todo.popleft()
            for (_, src), dst in TRANSITIONS.items():
                if src is cur:
                    nxt = dst if dst is not None else S.ACTIVE
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
        assert S.DESTROYED in seen, start


def test_pending_deletion_only_allows_cancel_or_destroy():
    assert sorted(a for (a, s) in TRANSITIONS if s is S.PENDING_DELETION) == [
        "cancel_deletion", "destroy"]


@pytest.mark.parametrize("prior", [S.ACTIVE, S.SUSPENDED, S.COMPROMISED, S.DEACTIVATED])
def test_cancel_deletion_restores_prior_state(prior):
    assert next_state("schedule_deletion", prior, "k") is S.PENDING_DELETION
    assert next_state("cancel_deletion", S.PENDING_DELETION, "k", prior) is prior


def test_cancel_deletion_without_recorded_prior_falls_back_to_active():
    assert next_state("cancel_deletion", S.PENDING_DELETION, "k", None) is S.ACTIVE


@pytest.mark.parametrize("state", [s for s in KeyState if s is not S.PENDING_DELETION])
def test_cancel_deletion_refused_outside_pending_deletion(state):
    with pytest.raises(kl.KeyStateError) as err:
        next_state("cancel_deletion", state, "orders")
    msg = str(err.value)
    assert "'orders'" in msg and state.value in msg


def test_illegal_transition_message_names_state_and_allowed_actions():
    with pytest.raises(kl.KeyStateError) as err:
        next_state("destroy", S.ACTIVE, "orders")
    msg = str(err.value)
    assert "cannot destroy key 'orders'" in msg
    assert "it is active" in msg
    assert "schedule deletion" in msg  # tells the user the way forward


def test_rotate_brings_compromised_and_deactivated_back_to_active():
    assert next_state("rotate", S.COMPROMISED, "k") is S.ACTIVE
    assert next_state("rotate", S.DEACTIVATED, "k") is S.ACTIVE
    with pytest.raises(kl.KeyStateError):
        next_state("rotate", S.SUSPENDED, "k")
    with pytest.raises(kl.KeyStateError):
        next_state("rotate", S.PENDING_DELETION, "k")


# -- uses per state ------------------------------------------------------------------------------
@pytest.mark.parametrize("state", list(KeyState))
def test_check_use_matches_sp800_57(state):
    protect = state is S.ACTIVE
    process = state in (S.ACTIVE, S.DEACTIVATED, S.COMPROMISED)
    for use, allowed in ((Use.PROTECT, protect), (Use.PROCESS, process)):
        if allowed:
            check_use(state, use, "k")
        else:
            with pytest.raises(kl.KeyStateError, match=state.value):
                check_use(state, use, "k")


# -- parse_period --------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("90d", timedelta(days=90)),
    ("1y", timedelta(days=365)),
    ("12h", timedelta(hours=12)),
    ("2w", timedelta(weeks=2)),
    ("30m", timedelta(minutes=30)),
    ("45s", timedelta(seconds=45)),
    (" 90 D ", timedelta(days=90)),
])
def test_parse_period_strings(text, expected):
    assert parse_period(text) == expected


def test_parse_period_passthrough_and_none():
    assert parse_period(None) is None
    assert parse_period(timedelta(days=3)) == timedelta(days=3)


@pytest.mark.parametrize("bad", ["abc", "", "90", "d", "-5d", "1.5d", "90x", "90 days", "1y2d"])
def test_parse_period_rejects_unreadable_text(bad):
    with pytest.raises(kl.InvalidInput, match="period"):
        parse_period(bad)


@pytest.mark.parametrize("bad", [90, 1.5, b"90d", ["90d"]])
def test_parse_period_rejects_wrong_types(bad):
    with pytest.raises(kl.InvalidInput, match="timedelta"):
        parse_period(bad)


@pytest.mark.parametrize("bad", ["0d", timedelta(0), timedelta(days=-1)])
def test_parse_period_rejects_non_positive(bad):
    with pytest.raises(kl.InvalidInput, match="positive"):
        parse_period(bad)


@given(n=st.integers(min_value=1, max_value=10**6), unit=st.sampled_from("smhdwy"))
def test_parse_period_units(n, unit):
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}[unit]
    if n * seconds <= 100 * 365 * 86400:
        assert parse_period(f"{n}{unit}") == timedelta(seconds=n * seconds)
    else:  # longer than 100 years: a typo, refused before timedelta() could overflow
        with pytest.raises(kl.InvalidInput, match="at most 100 years"):
            parse_period(f"{n}{unit}")


@pytest.mark.parametrize("bad", ["9999999999d", "1" * 40 + "d", "101y", "1" * 5000 + "s"])
def test_parse_period_refuses_huge_periods_with_a_message(bad):
    with pytest.raises(kl.InvalidInput, match="at most 100 years|cannot read period"):
        parse_period(bad)
    with pytest.raises(kl.InvalidInput, match="at most 100 years"):
        parse_period(timedelta(days=999_999_999))


# -- validate_name ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["orders", "a", "A1", "team/pay:orders@eu-1", "x.y_z", "9" * 128])
def test_validate_name_accepts(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name, fragment", [
    ("", "must not be empty"),
    ("a" * 129, "1-128"),
    ("has space", "invalid key name"),
    ("-leading", "starting with a letter or digit"),
    (".hidden", "starting with a letter or digit"),
    ("semi;colon", "invalid key name"),
    ("quote'", "invalid key name"),
    ("ключ", "invalid key name"),
    ("tab\t", "invalid key name"),
    ("new\nline", "invalid key name"),
    ("alice\n", "invalid key name"),  # `$` would let a trailing newline through
    ("alice\r\n", "invalid key name"),
])
def test_validate_name_rejects(name, fragment):
    with pytest.raises(kl.InvalidInput) as err:
        validate_name(name)
    assert fragment in str(err.value)


@pytest.mark.parametrize("value", [42, None, b"orders", ["orders"]])
def test_validate_name_rejects_non_strings(value):
    with pytest.raises(kl.InvalidInput, match=f"must be a string, not {type(value).__name__}"):
        validate_name(value)


def test_validate_name_uses_what_in_message():
    with pytest.raises(kl.InvalidInput, match="owner must not be empty"):
        validate_name("", "owner")


@given(st.text(max_size=140))
def test_validate_name_never_raises_anything_but_invalid_input(text):
    try:
        assert validate_name(text) == text
    except kl.InvalidInput:
        pass


# -- specs and purposes ------------------------------------------------------------------------------
def test_contract_specs_present():
    for name in ("AES_256", "AES_128", "HMAC_SHA256", "RSA_2048", "RSA_3072", "RSA_4096",
                 "EC_P256", "EC_P384", "ED25519"):
        assert name in kl.SPECS


@pytest.mark.parametrize("text", ["aes_256", "AES-256", " AES_256 "])
def test_parse_spec_normalises(text):
    assert parse_spec(text) is kl.SPECS["AES_256"]


def test_parse_spec_unknown_lists_all_specs():
    with pytest.raises(kl.InvalidInput) as err:
        parse_spec("AES_999")
    for name in kl.SPECS:
        assert name in str(err.value)


def test_parse_spec_wrong_type():
    with pytest.raises(kl.InvalidInput, match="must be a string"):
        parse_spec(256)


def test_parse_purpose_default_and_mismatch():
    assert parse_purpose(None, kl.SPECS["EC_P256"]) is Purpose.SIGN
    assert parse_purpose(None, kl.SPECS["HMAC_SHA256"]) is Purpose.MAC
    assert parse_purpose("wrap", kl.SPECS["AES_256"]) is Purpose.WRAP
    with pytest.raises(kl.InvalidInput, match="cannot serve purpose 'encrypt'"):
        parse_purpose("encrypt", kl.SPECS["EC_P256"])
    with pytest.raises(kl.InvalidInput, match="unknown purpose"):
        parse_purpose("bogus", kl.SPECS["AES_256"])


def test_default_rotation_periods():
    assert model.default_rotation_period(kl.SPECS["AES_256"], Purpose.ENCRYPT) == timedelta(days=90)
    assert model.default_rotation_period(kl.SPECS["EC_P256"], Purpose.SIGN) == timedelta(days=365)
