"""Parquet Modular Encryption with keyledger as the KMS (``keyledger.parquet``): pyarrow writes a
table whose PII column and footer are encrypted under keys it wraps with keyledger keys on a
real SoftHSM2 token; reading needs the ledger, every wrap and unwrap is one audited call, and a
key's state, a principal's grants and rotation behave as they do for ``decrypt``."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe
import pytest
from serve_support import client, new_home, start

import keyledger as kl
from keyledger import ciphertext as ct
from keyledger import parquet as kp
from keyledger.hsm import memory
from keyledger.parquet import crypto_factory

SSNS = ["123-45-6789", "987-65-4321", "555-01-2345"]
NAMES = ["Ada Lovelace", "Grace Hopper", "Alan Turing"]


def people() -> pa.Table:
    return pa.table({"id": [1, 2, 3], "name": NAMES, "ssn": SSNS})


@pytest.fixture
def keys(ledger):
    """``footer`` and ``pii``: keyledger AES keys as Parquet master keys."""
    ledger.create_key("footer", spec="AES_256", owner="data")
    ledger.create_key("pii", spec="AES_256", owner="data")
    return ledger


def write(ledger, path: Path, **options) -> Path:
    kp.write_table(people(), path, ledger, footer_key="footer",
                   columns={"ssn": "pii", "name": "pii"}, **options)
    return path


def parquet_records(ledger, action: str | None = None):
    """The audit records of the ledger's Parquet key wraps and unwraps, oldest first."""
    ledger.flush_audit()
    df = ledger.audit(limit=None)
    df = df[df["context"].fillna("").str.contains(kp.PURPOSE, regex=False)]
    if action is not None:
        df = df[df["action"] == action]
    return df.sort_values("seq").reset_index(drop=True)


def counting(monkeypatch) -> dict[str, list[str]]:
    """Every wrap and unwrap pyarrow asks the KMS client for, by master key."""
    calls: dict[str, list[str]] = {"wrap": [], "unwrap": []}
    wrap, unwrap = kp.KeyLedgerKmsClient.wrap_key, kp.KeyLedgerKmsClient.unwrap_key

    def counted_wrap(self, key_bytes, master_key_identifier):
        calls["wrap"].append(master_key_identifier)
        return wrap(self, key_bytes, master_key_identifier)

    def counted_unwrap(self, wrapped_key, master_key_identifier):
        calls["unwrap"].append(master_key_identifier)
        return unwrap(self, wrapped_key, master_key_identifier)

    monkeypatch.setattr(kp.KeyLedgerKmsClient, "wrap_key", counted_wrap)
    monkeypatch.setattr(kp.KeyLedgerKmsClient, "unwrap_key", counted_unwrap)
    return calls


def key_material(path: Path) -> dict[str, dict]:
    """The external key material beside ``path`` (``external_key_material=True``)."""
    store = json.loads(kp.key_material_file(path).read_text())
    return {k: json.loads(v) for k, v in store.items()}


def lake(path: Path, factory) -> ds.Dataset:
    """A folder of encrypted files as an Arrow dataset (docs/parquet.md's ``encrypted_lake``)."""
    config = ds.ParquetDecryptionConfig(factory, kp.kms_connection(), kp.decryption_config())
    fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
        decryption_config=config))
    return ds.dataset(path, format=fmt)


# -- round trip, confidentiality ---------------------------------------------------------------------
@pytest.mark.parametrize("double_wrapping", [True, False])
def test_encrypted_pii_column_and_footer_round_trip(keys, tmp_path, double_wrapping):
    path = write(keys, tmp_path / "people.parquet", double_wrapping=double_wrapping)
    assert kp.read_table(path, keys).equals(people())
    data = path.read_bytes()
    for secret in [*SSNS, *NAMES, "ssn"]:  # the values, and the schema (the footer is encrypted)
        assert secret.encode() not in data, secret
    # through pyarrow's own API with the factory
    factory = crypto_factory(keys)
    assert isinstance(factory, pq.encryption.CryptoFactory)
    props = factory.file_decryption_properties(kp.kms_connection())
    assert pq.read_table(path, decryption_properties=props).column("ssn").to_pylist() == SSNS


def test_a_file_does_not_read_without_keyledger(keys, tmp_path, clock):
    path = write(keys, tmp_path / "people.parquet")
    with pytest.raises(OSError, match="no decryption found"):
        pq.read_table(path)
    # another home with keys of the same names: its keys never wrapped this file's keys
    memory.init_home(tmp_path / "other")
    with kl.open(tmp_path / "other", principal="alice", clock=clock) as other:
        other.create_key("footer", spec="AES_256")
        other.create_key("pii", spec="AES_256")
        with pytest.raises(kl.InvalidCiphertext, match="master key 'footer'.*another keyledger "
                                                       "home"):
            kp.read_table(path, other)


def test_wrapped_keys_are_keyledger_ciphertexts_bound_to_their_master_key(keys, tmp_path):
    path = write(keys, tmp_path / "people.parquet", external_key_material=True)
    material = key_material(path)
    assert {m["masterKeyID"] for m in material.values()} == {"footer", "pii"}
    for m in material.values():
        header, _, _ = ct.parse(base64.b64decode(m["wrappedKEK"]))
        assert header.version == 1 and m["doubleWrapping"] is True
        assert len(base64.b64decode(m["wrappedDEK"])) == 12 + 32 + 16  # a 256-bit data key
    assert material["footerKey"]["kmsInstanceID"] == "keyledger"
    # the file names a master key the reader may use, but not the one that wrapped the key:
    # the encryption context (master_key_id) refuses it
    keys.create_key("public", spec="AES_256")
    store = kp.key_material_file(path)
    assert store == tmp_path / "_KEY_MATERIAL_FOR_people.parquet.json"
    raw = json.loads(store.read_text())
    store.write_text(json.dumps({k: v.replace('"masterKeyID":"pii"', '"masterKeyID":"public"')
                                 for k, v in raw.items()}))
    with pytest.raises(kl.InvalidCiphertext, match="master key 'public'.*altered"):
        kp.read_table(path, keys)
    refused = parquet_records(keys, "decrypt").iloc[-1]
    assert refused["key"] == "pii" and refused["outcome"] != "ok"


class ForeignKms(pe.KmsClient):
    """Another KMS's key material: ``wrapped`` is what it stores for every key."""

    def __init__(self, wrapped: str) -> None:
        super().__init__()
        self.wrapped = wrapped

    def wrap_key(self, key_bytes, master_key_identifier):
        return self.wrapped

    def unwrap_key(self, wrapped_key, master_key_identifier):
        raise AssertionError("not read by this KMS")


@pytest.mark.parametrize(("wrapped", "says"), [
    ("not*base64", "not base64 text"),
    (base64.b64encode(b"x" * 60).decode(), "not a keyledger ciphertext")])
def test_a_file_of_another_kms_is_refused_clearly(keys, tmp_path, wrapped, says):
    factory = pe.CryptoFactory(lambda _config: ForeignKms(wrapped))
    config = kp.encryption_config("footer", {"ssn": "pii"}, double_wrapping=False)
    path = tmp_path / "foreign.parquet"
    pq.write_table(people(), path, encryption_properties=factory.file_encryption_properties(
        kp.kms_connection(), config))
    with pytest.raises(kl.InvalidCiphertext, match=f"master key 'footer'.*{says}"):
        kp.read_table(path, keys)


def test_plaintext_footer_reads_plain_columns_without_keys(keys, tmp_path):
    path = write(keys, tmp_path / "people.parquet", plaintext_footer=True)
    assert pq.read_table(path, columns=["id"]).column("id").to_pylist() == [1, 2, 3]
    with pytest.raises(OSError):
        pq.read_table(path, columns=["ssn"])
    data = path.read_bytes()
    assert not any(s.encode() in data for s in [*SSNS, *NAMES])  # no plaintext statistics
    assert kp.read_table(path, keys).equals(people())


# -- audit ---------------------------------------------------------------------------------------------
def test_double_wrapping_one_audited_call_per_master_key(keys, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    path = write(keys, tmp_path / "people.parquet")
    assert sorted(calls["wrap"]) == ["footer", "pii"]
    kp.read_table(path, keys)
    assert sorted(calls["unwrap"]) == ["footer", "pii"]
    records = parquet_records(keys)
    assert list(records["action"]) == ["encrypt", "encrypt", "decrypt", "decrypt"]
    for _, r in records.iterrows():
        assert (r["principal"], r["outcome"], r["version"]) == ("alice", "ok", 1)
        assert json.loads(r["context"]) == kp.wrap_context(r["key"])
    assert sorted(records["key"]) == ["footer", "footer", "pii", "pii"]


def test_single_wrapping_audits_every_key_request(keys, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    n = 20_000
    table = pa.table({"id": list(range(n)), "ssn": [f"{i:03d}-00-{i % 9999:04d}" for i in range(n)]})
    path = tmp_path / "many.parquet"
    kp.write_table(table, path, keys, footer_key="footer", columns={"ssn": "pii"},
                   double_wrapping=False, row_group_size=2_000)
    assert kp.read_table(path, keys).equals(table)  # ten row groups, read by pyarrow's threads
    records = parquet_records(keys)
    # pyarrow asks for a column's key each time it opens that column's metadata or pages
    assert len(calls["unwrap"]) > 2
    assert sorted(records[records["action"] == "encrypt"]["key"]) == sorted(calls["wrap"])
    assert sorted(records[records["action"] == "decrypt"]["key"]) == sorted(calls["unwrap"])
    assert set(records["outcome"]) == {"ok"}


# -- rotation ---------------------------------------------------------------------------------------
def test_a_file_written_before_rotation_still_reads(keys, tmp_path):
    old = write(keys, tmp_path / "old.parquet")
    keys.rotate("pii")
    keys.rotate("footer")
    new = write(keys, tmp_path / "new.parquet")
    assert kp.read_table(old, keys).equals(people())
    assert kp.read_table(new, keys).equals(people())
    reads = parquet_records(keys, "decrypt")
    assert list(reads["version"]) == [1, 1, 2, 2]


def test_external_key_material_is_rewrapped_after_rotation(keys, tmp_path, clock):
    path = write(keys, tmp_path / "people.parquet", external_key_material=True)
    inside = write(keys, tmp_path / "inside.parquet")
    data = path.read_bytes()
    keys.rotate("pii")
    keys.rotate("footer")
    kp.rotate_key_material(path, keys)
    assert path.read_bytes() == data  # the data file is untouched, only its key material
    for m in key_material(path).values():
        assert ct.parse(base64.b64decode(m["wrappedKEK"]))[0].version == 2
    # version 1 retired: the re-wrapped file reads, the file with key material inside does not
    keys.trim("pii", 2)
    assert kp.read_table(path, keys).equals(people())
    with pytest.raises(kl.KeyStateError, match="master key 'pii'.*version 1"):
        kp.read_table(inside, keys)
    with pytest.raises(kl.InvalidInput, match="inside the file.*rewrite it"):
        kp.rotate_key_material(inside, keys)
    with pytest.raises(kl.InvalidInput, match="no Parquet file"):
        kp.rotate_key_material(tmp_path / "missing.parquet", keys)


# -- key states, grants --------------------------------------------------------------------------------
@pytest.mark.parametrize("state", ["disabled", "pending_deletion", "destroyed"])
def test_a_master_key_out_of_use_stops_reading(keys, tmp_path, clock, state):
    path = write(keys, tmp_path / "people.parquet")
    if state == "disabled":
        keys.disable("pii")
    else:
        keys.schedule_deletion("pii", 7)
    if state == "destroyed":
        clock.advance(days=8)
        keys.destroy("pii")
    with pytest.raises(kl.KeyStateError, match="unwrapping a Parquet key of master key 'pii'"):
        kp.read_table(path, keys)
    # the columns under the footer key alone still read
    assert kp.read_table(path, keys, columns=["id"]).column("id").to_pylist() == [1, 2, 3]
    refused = parquet_records(keys, "decrypt")
    refused = refused[refused["outcome"] != "ok"]
    assert list(refused["key"]) == ["pii"] and refused["error"].iloc[0] == "KeyStateError"


def test_a_long_lived_factory_stops_reading_once_the_key_is_disabled(keys, tmp_path):
    path = write(keys, tmp_path / "people.parquet")
    factory, conn = crypto_factory(keys), kp.kms_connection()
    pq.read_table(path, decryption_properties=factory.file_decryption_properties(conn))
    keys.disable("pii")
    with pytest.raises(kl.KeyStateError, match="suspended"):
        pq.read_table(path, decryption_properties=factory.file_decryption_properties(conn))
    # pyarrow's own caching (cache_keys=True): the key-encryption key it unwrapped before
    # keeps reading, whatever cache_lifetime says; documented in docs/parquet.md
    keys.enable("pii")
    cached = crypto_factory(keys, cache_keys=True)
    pq.read_table(path, decryption_properties=cached.file_decryption_properties(conn))
    keys.disable("pii")
    config = kp.decryption_config(cache_lifetime=0)
    table = pq.read_table(path, decryption_properties=cached.file_decryption_properties(
        conn, config))
    assert table.column("ssn").to_pylist() == SSNS
    cached.remove_cache_entries_for_all_tokens()
    with pytest.raises(kl.KeyStateError):
        pq.read_table(path, decryption_properties=cached.file_decryption_properties(conn))


def test_a_dataset_scan_uses_its_factory_as_pyarrow_caches_it(keys, tmp_path):
    """pyarrow.dataset calls the factory from C++ (past crypto_factory's cache reset): a
    factory kept with a dataset format keeps its KEKs, a new factory asks keyledger again."""
    (tmp_path / "lake").mkdir()
    for part in ("a", "b"):
        write(keys, tmp_path / "lake" / f"{part}.parquet")

    def scan(factory) -> int:
        return lake(tmp_path / "lake", factory).to_table().num_rows

    kept = crypto_factory(keys)
    assert scan(kept) == 6
    keys.disable("pii")
    assert scan(kept) == 6  # documented in docs/parquet.md: use a new factory per scan
    with pytest.raises(kl.KeyStateError, match="master key 'pii'"):
        scan(crypto_factory(keys))


def test_a_principal_without_user_on_the_key_cannot_read_the_column(keys, tmp_path, clock):
    path = write(keys, tmp_path / "people.parquet")
    keys.grant("footer", "bob", "user")
    with kl.open(keys.home, principal="bob", clock=clock) as bob:
        with pytest.raises(kl.AccessDenied, match="master key 'pii'"):
            kp.read_table(path, bob)
        assert kp.read_table(path, bob, columns=["id"]).num_rows == 3
        with pytest.raises(kl.AccessDenied, match="wrapping a Parquet key with master key 'pii'"):
            write(bob, tmp_path / "bob.parquet")
    denied = parquet_records(keys)
    denied = denied[denied["principal"] == "bob"]
    assert set(zip(denied["action"], denied["key"], denied["outcome"], strict=True)) >= {
        ("decrypt", "pii", "denied"), ("decrypt", "footer", "ok"), ("encrypt", "pii", "denied")}


def test_bad_arguments_are_refused_before_anything_is_written(keys, tmp_path):
    path = tmp_path / "people.parquet"
    with pytest.raises(kl.InvalidInput, match="not in the table: email"):
        kp.write_table(people(), path, keys, footer_key="footer", columns={"email": "pii"})
    with pytest.raises(kl.InvalidInput, match="columns maps"):
        kp.write_table(people(), path, keys, footer_key="footer", columns={})
    with pytest.raises(kl.InvalidInput, match="without ':'"):
        kp.encryption_config("footer", {"ssn": "pii:x"})
    with pytest.raises(kl.InvalidInput, match="footer_key"):
        kp.encryption_config("", {"ssn": "pii"})
    with pytest.raises(kl.InvalidInput, match="kl.open"):
        crypto_factory("not a ledger")
    with pytest.raises(kl.KeyNotFound, match="master key 'nope'"):
        kp.write_table(people(), path, keys, footer_key="nope", columns={"ssn": "pii"})
    assert not path.exists()


def test_duckdb_queries_the_table_keyledger_decrypted(keys, tmp_path):
    """DuckDB's own Parquet encryption takes raw keys (PRAGMA add_parquet_key), not a KMS: it
    cannot open the file; it queries the Arrow table pyarrow decrypted."""
    path = write(keys, tmp_path / "people.parquet")
    with pytest.raises(duckdb.Error):
        duckdb.sql(f"SELECT * FROM read_parquet('{path}')").fetchall()
    people_table = kp.read_table(path, keys)
    con = duckdb.connect()
    con.register("people", people_table)
    assert con.sql("SELECT count(*), max(ssn) FROM people").fetchall() == [(3, max(SSNS))]
    # a folder, read as an Arrow dataset by pyarrow, then queried by DuckDB. Registering the
    # dataset itself hung once in a full run (DuckDB's scan thread held the GIL in pyarrow's
    # to_reader() while pyarrow waited for the key callback, which needs the GIL).
    (tmp_path / "lake").mkdir()
    for part in ("a", "b"):
        write(keys, tmp_path / "lake" / f"{part}.parquet")
    con.register("lake", lake(tmp_path / "lake", crypto_factory(keys)).to_table())
    assert con.sql("SELECT count(*), count(DISTINCT ssn) FROM lake").fetchall() == [(6, 3)]
    con.close()


class AwsKmsClient(pe.KmsClient):
    """What a KmsClient of another Parquet implementation (parquet-java for Spark) would do
    through keyledger serve's AWS KMS API: the same context, the CiphertextBlob in base64."""

    def __init__(self, kms) -> None:
        super().__init__()
        self.kms = kms

    def wrap_key(self, key_bytes, master_key_identifier):
        blob = self.kms.encrypt(KeyId=f"alias/{master_key_identifier}", Plaintext=key_bytes,
                                EncryptionContext=kp.wrap_context(master_key_identifier))
        return base64.b64encode(blob["CiphertextBlob"]).decode()

    def unwrap_key(self, wrapped_key, master_key_identifier):
        return self.kms.decrypt(CiphertextBlob=base64.b64decode(wrapped_key),
                                KeyId=f"alias/{master_key_identifier}",
                                EncryptionContext=kp.wrap_context(master_key_identifier)
                                )["Plaintext"]


# -- through keyledger serve ----------------------------------------------------------------------------
def test_through_kl_connect(tmp_path, simulation_template):
    home, access = new_home(tmp_path, simulation_template)
    with kl.open(home, principal="admin") as admin:
        admin.create_key("footer", spec="AES_256")
        admin.create_key("pii", spec="AES_256")
        for key in ("footer", "pii"):
            admin.grant(key, "app1", "user")
        admin.grant("footer", "app2", "user")
    server = start(home)
    try:
        def connect(principal):
            return kl.connect(server.url, access_key_id=access[principal]["AccessKeyId"],
                              secret_access_key=access[principal]["SecretAccessKey"])

        path = tmp_path / "people.parquet"
        with connect("app1") as app1:
            write(app1, path)
            assert kp.read_table(path, app1).equals(people())
        with connect("app2") as app2:
            with pytest.raises(kl.AccessDenied, match="master key 'pii'"):
                kp.read_table(path, app2)
            assert kp.read_table(path, app2, columns=["id"]).num_rows == 3
        # the AWS KMS API of the same server unwraps the same key material
        kms = client(server.url, access["app1"])
        factory = pe.CryptoFactory(lambda _config: AwsKmsClient(kms))
        props = factory.file_decryption_properties(kp.kms_connection())
        assert pq.read_table(path, decryption_properties=props).equals(people())
    finally:
        assert server.stop() == 0, server.log.read_text()
    with kl.open(home, principal="admin") as admin:
        records = parquet_records(admin)
    seen = list(zip(records["principal"], records["action"], records["key"], records["outcome"],
                    strict=True))
    assert sorted(seen[:4]) == [("app1", "decrypt", "footer", "ok"),
                                ("app1", "decrypt", "pii", "ok"),
                                ("app1", "encrypt", "footer", "ok"),
                                ("app1", "encrypt", "pii", "ok")]
    assert ("app2", "decrypt", "pii", "denied") in seen
    assert sorted(seen[-2:]) == [("app1", "decrypt", "footer", "ok"),  # the AWS KMS API's reads
                                 ("app1", "decrypt", "pii", "ok")]
