"""The compiled validators (hook/oci_portfwd/validators.py) are generated from the schemas:
they must be current, and accept and reject exactly what jsonschema does."""

import json
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oci_portfwd import validators

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "schemas"))
import compile_validators  # noqa: E402


def test_generated_module_is_current():
    pytest.importorskip("fastjsonschema", reason="fastjsonschema generates the validators (make venv installs it)")
    generated = (REPO / "hook" / "oci_portfwd" / "validators.py").read_text()
    assert generated == compile_validators.generate(), "stale: run `make validators`"


def schema(name):
    return json.loads((REPO / "schemas" / name).read_text())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 100000) | st.floats(-1, 1000, allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["/run/x", "builtin", "pasta", "debug", "created", "web1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
config_keys = st.sampled_from(sorted(schema("config.schema.json")["properties"]) + ["colour"])
state_keys = st.sampled_from(sorted(schema("oci-state.schema.json")["properties"]) + ["extra"])


def agree(validate, schema_doc, instance):
    expected = jsonschema.validators.validator_for(schema_doc)(schema_doc).is_valid(instance)
    try:
        validate(instance)
        got = True
    except validators.SchemaViolation:
        got = False
    assert got == expected, instance


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(config_keys, json_values, max_size=5) | json_values)
def test_config_validator_agrees_with_jsonschema(instance):
    agree(validators.validate_config, schema("config.schema.json"), instance)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(state_keys, json_values, max_size=7) | json_values)
def test_state_validator_agrees_with_jsonschema(instance):
    agree(validators.validate_oci_state, schema("oci-state.schema.json"), instance)


@pytest.mark.parametrize("state", [
    {"ociVersion": "1.0", "id": "web", "pid": 42, "root": "rootfs", "bundle": "/b", "status": "created",
     "annotations": {"io.oci-portfwd.ports": "8080:80"}},
    {"ociVersion": "1.0.2-dev", "id": "a" * 64, "status": "stopped", "bundle": "/b"},
])
def test_real_runtime_states_pass(state):
    validators.validate_oci_state(state)
