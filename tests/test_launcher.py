"""The launcher's environment: services are configured only by what the launcher sets."""

from __future__ import annotations

from splitunet.launcher import service_environment


def test_service_settings_in_the_callers_environment_are_not_inherited():
    env = {"PATH": "/bin", "HOME": "/root", "SITE_MAX_BATCH_VOXELS": "1", "AGG_DATA_DIR": "/x", "AUDIT_X": "1",
           "MY_SITE_NAME": "kept"}
    assert service_environment(env) == {"PATH": "/bin", "HOME": "/root", "MY_SITE_NAME": "kept"}
