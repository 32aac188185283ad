"""Compliance rules as data: one TOML file per framework, loaded and validated here.

A rule file (``compliance/rules/*.toml`` shipped with keyledger, then ``<home>/rules/*.toml``)::

    framework = "PCI DSS v4.0"          # the framework its rules belong to
    aliases = ["pci", "pci-dss"]        # other names accepted by compliance(frameworks=...)
    description = "..."                 # optional: shown in reports
    url = "https://..."                 # optional

    [[rule]]
    id = "pci.dual-control"             # unique; a later file with the same id replaces it
    control = "3.7.6"
    severity = "high"                   # critical | high | medium | low | info
    title = "..."
    rationale = "..."                   # why the control matters (shown to auditors)
    remediation = "..."                 # what to do about a finding
    parameters = { min_approvers = 2 }  # thresholds; referenced in the SQL as $min_approvers
    sql = '''SELECT ... AS key, ... AS version, ... AS principal, {...} AS evidence FROM ...'''
    # or, instead of sql: check_from = "<another rule id>" to reuse its check (and parameters)

    [overrides."nist.rotation-overdue"] # change a rule defined in another file, keeping its SQL
    parameters = { grace_days = 7 }
    severity = "medium"
    enabled = false

The SQL is one SELECT over the store's tables returning one row per finding with the columns
``key`` (key name, NULL for home-wide findings), ``version``, ``principal`` and ``evidence``
(a STRUCT, MAP or JSON text naming values and audit ``seq`` ids). ``$now`` (the evaluation time,
naive UTC) is always available, as are the helper objects described in docs/compliance.md.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InvalidInput
from ..store.compliance import SEVERITIES
from ..store.sql import check_read_only, positional_parameters, referenced_parameters

BUILTIN_PARAMETERS = frozenset({"now"})
PACKAGE_RULES = Path(__file__).resolve().parent / "rules"
USER_RULES_DIR = "rules"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PARAM_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
_RULE_KEYS = {"id", "control", "severity", "title", "rationale", "remediation", "parameters",
              "sql", "check_from", "enabled", "framework"}
_OVERRIDE_KEYS = {"parameters", "severity", "enabled", "title", "remediation", "rationale",
                  "control"}
_FILE_KEYS = {"framework", "aliases", "description", "url", "rule", "overrides"}


@dataclass(frozen=True)
class Rule:
    """One check: metadata for people, a set-based SQL query for the store."""

    id: str
    framework: str
    control: str
    severity: str
    title: str
    rationale: str
    remediation: str
    sql: str
    parameters: dict[str, Any]
    source: str
    check_from: str | None = None
    enabled: bool = True

    @property
    def rank(self) -> int:
        return SEVERITIES.index(self.severity)

    def bound_parameters(self) -> dict[str, Any]:
        """The parameters the SQL references (DuckDB refuses unused named parameters)."""
        return {name: self.parameters[name] for name in referenced_parameters(self.sql)
                if name in self.parameters}


@dataclass
class Framework:
    name: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    url: str = ""
    sources: list[str] = field(default_factory=list)


@dataclass
class RuleSet:
    """Every loaded rule (by id, in load order) and the frameworks they belong to."""

    rules: dict[str, Rule]
    frameworks: dict[str, Framework]
    sources: list[str]

    def enabled(self) -> list[Rule]:
        return [r for r in self.rules.values() if r.enabled]

    def resolve_frameworks(self, frameworks: object) -> list[str]:
        """Names or aliases (any case) -> canonical framework names; all of them for None."""
        if frameworks is None:
            return list(self.frameworks)
        if isinstance(frameworks, str):
            frameworks = [frameworks]
        try:
            wanted = list(frameworks)  # type: ignore[call-overload]
        except TypeError:
            raise InvalidInput("frameworks must be a framework name or a list of them") from None
        lookup: dict[str, str] = {}
        for fw in self.frameworks.values():
            for label in (fw.name, *fw.aliases):
                lookup[_norm(label)] = fw.name
        out: list[str] = []
        for item in wanted:
            if not isinstance(item, str) or _norm(item) not in lookup:
                known = "; ".join(f"{f.name} ({', '.join(f.aliases)})" if f.aliases else f.name
                                  for f in self.frameworks.values())
                raise InvalidInput(f"unknown framework {item!r}; known: {known}")
            name = lookup[_norm(item)]
            if name not in out:
                out.append(name)
        return out

    def select(self, frameworks: list[str]) -> list[Rule]:
        chosen = set(frameworks)
        return [r for r in self.enabled() if r.framework in chosen]


def _norm(label: str) -> str:
    return re.sub(r"[\s_/:.-]+", "", label.lower())


def rule_files(home: Path | None) -> list[Path]:
    files = sorted(PACKAGE_RULES.glob("*.toml"))
    if home is not None:
        user = Path(home) / USER_RULES_DIR
        if user.is_dir():
            files += sorted(user.glob("*.toml"))
    return files


def load_rules(home: Path | None = None, files: list[Path] | None = None) -> RuleSet:
    """Load the shipped rules, then ``<home>/rules/*.toml`` (same id: the later one wins).

    Raises ``ConfigError`` naming the file and the rule for anything malformed.
    """
    paths = files if files is not None else rule_files(home)
    texts = [(path, _bytes(path)) for path in paths]
    signature = tuple((str(path), data) for path, data in texts)
    cached = _loaded.get(signature)
    if cached is None:
        cached = _load(texts)
        if len(_loaded) >= 16:
            _loaded.clear()
        _loaded[signature] = cached
    return RuleSet(dict(cached.rules),  # containers copied: no caller shares them
                   {n: replace(fw, sources=list(fw.sources)) for n, fw in cached.frameworks.items()},
                   list(cached.sources))


# the files' paths and bytes -> the rules they make: rules are loaded for every evaluation and
# every dashboard refresh, and parsing and checking them cost ~2.5 ms of CPU a load
_loaded: dict[tuple[tuple[str, bytes], ...], RuleSet] = {}


def _load(texts: list[tuple[Path, bytes]]) -> RuleSet:
    paths = [path for path, _ in texts]
    rules: dict[str, Rule] = {}
    frameworks: dict[str, Framework] = {}
    overrides: list[tuple[Path, str, dict]] = []
    for path, data in texts:
        doc = _read(path, data)
        unknown = set(doc) - _FILE_KEYS
        if unknown:
            raise ConfigError(f"rule file {path}: unknown top-level setting(s) "
                              f"{', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_FILE_KEYS))}")
        raw_rules = doc.get("rule", [])
        if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
            raise ConfigError(f"rule file {path}: write each rule as a [[rule]] table")
        fw_name = doc.get("framework")
        if raw_rules or fw_name is not None:
            if not isinstance(fw_name, str) or not fw_name.strip():
                ids = ", ".join(repr(r.get("id")) for r in raw_rules) or "none"
                raise ConfigError(f"rule file {path}, rule(s) {ids}: set framework = \"<name>\" "
                                  "at the top of the file (the framework its rules belong to)")
            _merge_framework(frameworks, path, fw_name.strip(), doc)
        seen_here: set[str] = set()
        for index, raw in enumerate(raw_rules, start=1):
            rule = _parse_rule(path, index, raw, fw_name.strip() if fw_name else "")
            if rule.id in seen_here:
                raise ConfigError(f"rule file {path}, rule {rule.id!r}: the id appears twice in "
                                  "this file")
            seen_here.add(rule.id)
            rules.pop(rule.id, None)  # a redefinition moves to the end (load order)
            rules[rule.id] = rule
        raw_over = doc.get("overrides", {})
        if not isinstance(raw_over, dict):
            raise ConfigError(f"rule file {path}: write overrides as [overrides.\"<rule id>\"]")
        for rule_id, change in raw_over.items():
            if not isinstance(change, dict):
                raise ConfigError(f"rule file {path}, override of rule {rule_id!r}: expected a "
                                  "table of settings")
            overrides.append((path, rule_id, change))
    for path, rule_id, change in overrides:
        if rule_id not in rules:
            raise ConfigError(f"rule file {path}, override of rule {rule_id!r}: no rule has "
                              "that id")
        rules[rule_id] = _apply_override(path, rules[rule_id], change)
    rules = _resolve_check_from(rules)
    return RuleSet(rules, frameworks, [str(p) for p in paths])


def _bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read rule file {path}: {exc.strerror or exc}") from None


def _read(path: Path, data: bytes) -> dict:
    """The file's TOML (``load_rules`` keeps what the files make per their bytes)."""
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"rule file {path} is not valid TOML (not UTF-8 text: {exc.reason}); "
                          "no rule in it could be read") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"rule file {path} is not valid TOML ({exc}); no rule in it could be "
                          "read") from None


def _merge_framework(frameworks: dict[str, Framework], path: Path, name: str, doc: dict) -> None:
    aliases = doc.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ConfigError(f"rule file {path}: aliases must be a list of strings")
    for key in ("description", "url"):
        if key in doc and not isinstance(doc[key], str):
            raise ConfigError(f"rule file {path}: {key} must be a string")
    fw = frameworks.setdefault(name, Framework(name))
    fw.aliases = tuple(dict.fromkeys([*fw.aliases, *aliases]))
    fw.description = doc.get("description") or fw.description
    fw.url = doc.get("url") or fw.url
    fw.sources.append(str(path))


def _text(path: Path, label: str, raw: dict, key: str, required: bool = True) -> str:
    value = raw.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"rule file {path}, rule {label}: {key} must be a non-empty string")
    return value.strip()


def _parse_rule(path: Path, index: int, raw: dict, framework: str) -> Rule:
    rid = raw.get("id")
    label = repr(rid) if isinstance(rid, str) and rid else f"#{index} (no id)"
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise ConfigError(f"rule file {path}, rule {label}: id must be 1-100 letters, digits and "
                          ". _ - (e.g. 'pci.dual-control')")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ConfigError(f"rule file {path}, rule {label}: unknown setting(s) "
                          f"{', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_RULE_KEYS))}")
    if "framework" in raw and raw["framework"] != framework:
        raise ConfigError(f"rule file {path}, rule {label}: its framework must be the file's "
                          f"({framework!r}); put rules of another framework in their own file")
    severity = raw.get("severity")
    if severity not in SEVERITIES:
        raise ConfigError(f"rule file {path}, rule {label}: severity must be one of "
                          f"{', '.join(SEVERITIES)}, not {severity!r}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"rule file {path}, rule {label}: enabled must be true or false")
    params = _parameters(path, label, raw.get("parameters", {}))
    sql, check_from = raw.get("sql"), raw.get("check_from")
    if (sql is None) == (check_from is None):
        raise ConfigError(f"rule file {path}, rule {label}: give either sql (the check) or "
                          "check_from (the id of a rule whose check to reuse), not both or neither")
    if check_from is not None and not isinstance(check_from, str):
        raise ConfigError(f"rule file {path}, rule {label}: check_from must be a rule id")
    rule = Rule(
        id=rid, framework=framework, control=_text(path, label, raw, "control"),
        severity=severity, title=_text(path, label, raw, "title"),
        rationale=_text(path, label, raw, "rationale"),
        remediation=_text(path, label, raw, "remediation"),
        sql="" if sql is None else sql, parameters=params, source=str(path),
        check_from=check_from, enabled=enabled)
    if sql is not None:
        _check_sql(path, label, sql, params)
    return rule


def _parameters(path: Path, label: str, params: object) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise ConfigError(f"rule file {path}, rule {label}: parameters must be a table "
                          "(e.g. parameters = {{ days = 30 }})")
    out: dict[str, Any] = {}
    for name, value in params.items():
        if not _PARAM_NAME_RE.match(name) or name in BUILTIN_PARAMETERS:
            raise ConfigError(f"rule file {path}, rule {label}: parameter name {name!r} must be "
                              "lower-case letters, digits and _ (and not 'now')")
        if not _scalar(value) and not (isinstance(value, list) and value
                                       and all(_scalar(v) for v in value)
                                       and len({type(v) for v in value}) == 1):
            raise ConfigError(f"rule file {path}, rule {label}: parameter {name!r} must be a "
                              "number, string, boolean or a non-empty list of one of them")
        out[name] = value
    return out


def _scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


def _check_sql(path: Path, label: str, sql: str, params: dict[str, Any]) -> None:
    if not isinstance(sql, str) or not sql.strip():
        raise ConfigError(f"rule file {path}, rule {label}: sql must be a non-empty string")
    check = check_read_only(sql)
    if check.parse_error is not None:
        raise ConfigError(f"rule file {path}, rule {label}: the sql does not parse: "
                          f"{check.parse_error}")
    if not check.ok:
        raise ConfigError(f"rule file {path}, rule {label}: the sql must be exactly one SELECT "
                          "statement (rules read the store; they never change it)")
    if positional_parameters(sql):
        raise ConfigError(f"rule file {path}, rule {label}: use named parameters ($name), not "
                          "? or $1")
    missing = [p for p in referenced_parameters(sql)
               if p not in params and p not in BUILTIN_PARAMETERS]
    if missing:
        raise ConfigError(f"rule file {path}, rule {label}: the sql uses "
                          f"{', '.join('$' + m for m in missing)} but the rule declares no such "
                          "parameter")


def _apply_override(path: Path, rule: Rule, change: dict) -> Rule:
    label = repr(rule.id)
    unknown = set(change) - _OVERRIDE_KEYS
    if unknown:
        raise ConfigError(f"rule file {path}, override of rule {label}: unknown setting(s) "
                          f"{', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_OVERRIDE_KEYS))}")
    updates: dict[str, Any] = {}
    if "severity" in change:
        if change["severity"] not in SEVERITIES:
            raise ConfigError(f"rule file {path}, override of rule {label}: severity must be one "
                              f"of {', '.join(SEVERITIES)}")
        updates["severity"] = change["severity"]
    if "enabled" in change:
        if not isinstance(change["enabled"], bool):
            raise ConfigError(f"rule file {path}, override of rule {label}: enabled must be true "
                              "or false")
        updates["enabled"] = change["enabled"]
    for key in ("title", "remediation", "rationale", "control"):
        if key in change:
            updates[key] = _text(path, f"{label} (override)", change, key)
    if "parameters" in change:
        new = _parameters(path, f"{label} (override)", change["parameters"])
        for name, value in new.items():
            if rule.parameters and name not in rule.parameters:
                raise ConfigError(f"rule file {path}, override of rule {label}: the rule has no "
                                  f"parameter {name!r} (it has: {', '.join(rule.parameters)})")
            old = rule.parameters.get(name)
            if old is not None and _kind(old) != _kind(value):
                raise ConfigError(f"rule file {path}, override of rule {label}: parameter "
                                  f"{name!r} must stay a {_kind(old)} like its default {old!r}")
        updates["parameters"] = {**rule.parameters, **new}
    return replace(rule, **updates, source=f"{rule.source} (overridden in {path})")


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "list"


def _resolve_check_from(rules: dict[str, Rule]) -> dict[str, Rule]:
    out: dict[str, Rule] = {}
    for rid, rule in rules.items():
        if rule.check_from is None:
            out[rid] = rule
            continue
        seen = [rid]
        base = rule
        while base.check_from is not None:
            target = rules.get(base.check_from)
            if target is None:
                raise ConfigError(f"rule file {rule.source}, rule {rid!r}: check_from names "
                                  f"{base.check_from!r}, but no rule has that id")
            if target.id in seen:
                raise ConfigError(f"rule file {rule.source}, rule {rid!r}: check_from goes round "
                                  f"in a circle ({' -> '.join([*seen, target.id])})")
            seen.append(target.id)
            base = target
        for name in rule.parameters:
            if name not in base.parameters:
                raise ConfigError(f"rule file {rule.source}, rule {rid!r}: parameter {name!r} is "
                                  f"not a parameter of {base.id!r}, whose check it reuses")
        out[rid] = replace(rule, sql=base.sql, parameters={**base.parameters, **rule.parameters})
    return out


__all__ = ["SEVERITIES", "Framework", "Rule", "RuleSet", "load_rules", "referenced_parameters"]
