"""The .rpm from `make rpm` (Debian's rpmbuild): its file list against the expected one, the
%config(noreplace) config, its dependencies, and rpmlint with Fedora's settings."""

import subprocess

from pkgkit import REPO, need_apt_packages, python_modules, rpm_arch, schema_files


def fedora_sitelib() -> str:
    # What Fedora's %python3_sitelib is for the python3 that built the package.
    return subprocess.run(
        ["/usr/bin/python3", "-Ic", "import sysconfig; print(sysconfig.get_path('purelib', "
         "'posix_prefix', vars={'base': '/usr', 'platbase': '/usr'}))"],
        capture_output=True, text=True, check=True, timeout=30).stdout.strip()


def rpm_query(rpm, *args: str) -> list[str]:
    return subprocess.run(["rpm", "-qp", *args, str(rpm)], capture_output=True, text=True,
                          check=True, timeout=30).stdout.splitlines()


def expected_paths(tree) -> set[str]:
    sitelib = fedora_sitelib()
    paths = {
        "/etc/containers/oci-portfwd.json",
        "/usr/bin/oci-portfwd-hook",
        "/usr/bin/oci-portfwd-runtime",
        "/usr/libexec/oci",
        "/usr/libexec/oci/hooks.d",
        "/usr/libexec/oci/hooks.d/oci-portfwd-hook",
        "/usr/libexec/oci-portfwd-hook",
        "/usr/libexec/oci-portfwd-hook/portfwd-dialer",
        "/usr/libexec/oci-portfwd-hook/portfwd-keeper",
        "/usr/libexec/oci-portfwd-hook/portfwd_relay.abi3.so",
        "/usr/share/containers/oci",
        "/usr/share/containers/oci/hooks.d",
        "/usr/share/containers/oci/hooks.d/oci-portfwd-hook.json",
        "/usr/share/man/man1/oci-portfwd-hook.1.gz",
        "/usr/share/man/man1/oci-portfwd-runtime.1.gz",
        "/usr/share/man/man5/oci-portfwd.json.5.gz",
        "/usr/share/oci-portfwd-hook",
        "/usr/share/oci-portfwd-hook/schemas",
    }
    paths |= {f"/usr/share/oci-portfwd-hook/schemas/{name}" for name in schema_files(tree)}
    modules = python_modules(tree)
    paths |= {f"{sitelib}/{m}" for m in modules}
    # The package's directories (%{python3_sitelib}/oci_portfwd/ owns its whole tree).
    for m in modules:
        parts = m.split("/")[:-1]
        paths |= {f"{sitelib}/{'/'.join(parts[:i])}" for i in range(1, len(parts) + 1)}
    return paths


def test_rpm_file_list(built_rpm):
    listed = set(rpm_query(built_rpm.path, "-l"))
    sitelib = fedora_sitelib()
    dist_info = f"{sitelib}/oci_portfwd_hook-{built_rpm.version}.dist-info"
    assert f"{dist_info}/METADATA" in listed
    # rpm's docdir is NAME (Fedora) or NAME-VERSION (Debian's rpm macros).
    docs = {p for p in listed if p.startswith(("/usr/share/doc/", "/usr/share/licenses/"))}
    assert any(p.endswith("/README.md") for p in docs), docs
    assert any(p.startswith("/usr/share/licenses/") and p.endswith("/LICENSE") for p in docs), docs
    # rpm links each ELF file's build-id there (Fedora too): the native dialer's.
    build_ids = {p for p in listed if p.startswith("/usr/lib/.build-id")}
    assert any(p.count("/") == 5 for p in build_ids), listed
    rest = {p for p in listed - docs - build_ids if not p.startswith(dist_info)}
    expected = expected_paths(built_rpm.source)
    assert rest == expected, (f"missing: {sorted(expected - rest)}; "
                              f"unexpected: {sorted(rest - expected)}")
    assert not any("__pycache__" in p or "/usr/local/" in p for p in listed)


def test_rpm_config_is_noreplace_and_arch_the_machines(built_rpm):
    flags = dict(line.split(" ", 1)[::-1] for line in
                 rpm_query(built_rpm.path, "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]"))
    assert flags["/etc/containers/oci-portfwd.json"] == "cn"  # %config(noreplace)
    assert rpm_query(built_rpm.path, "--qf", "%{ARCH} %{VERSION}\n") == [
        f"{rpm_arch()} {built_rpm.version}"]  # the native dialer is compiled
    modes = dict(line.split(" ", 1)[::-1] for line in
                 rpm_query(built_rpm.path, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]"))
    assert modes["/usr/libexec/oci-portfwd-hook/portfwd-dialer"] == "---x--x--x"  # execute-only
    assert modes["/usr/libexec/oci-portfwd-hook/portfwd-keeper"] == "-rwxr-xr-x"


def test_rpm_dependencies(built_rpm):
    requires = set(rpm_query(built_rpm.path, "--requires"))
    for dep in ("python3-pyroute2 >= 0.7.2", "python3-jsonschema >= 4.10.3",
                "python3-prctl >= 1.8.1", "python3 >= 3.11", "python3-libseccomp"):
        assert dep in requires, requires
    # pyseccomp (setup.cfg) is PyPI's stand-in for python3-libseccomp: no such Fedora package.
    assert not any("pyseccomp" in r for r in requires), requires
    assert rpm_query(built_rpm.path, "--recommends") == ["(crun or runc)"]
    assert {"slirp4netns", "passt"} <= set(rpm_query(built_rpm.path, "--suggests"))


def test_rpm_installs_packaged_files_unchanged(built_rpm, tmp_path):
    cpio = subprocess.run(["rpm2cpio", str(built_rpm.path)], capture_output=True, check=True,
                          timeout=30).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=tmp_path, check=True, timeout=30)
    for packaged, source in [
        ("etc/containers/oci-portfwd.json", "packaging/oci-portfwd.json"),
        ("usr/share/containers/oci/hooks.d/oci-portfwd-hook.json",
         "packaging/hooks.d/oci-portfwd-hook.json"),
        ("usr/libexec/oci/hooks.d/oci-portfwd-hook", "packaging/libexec/oci-portfwd-hook"),
    ]:
        assert (tmp_path / packaged).read_bytes() == (built_rpm.source / source).read_bytes(), packaged


def test_rpmlint_reports_no_errors(built_rpm):
    need_apt_packages("rpmlint")
    spec = REPO / "packaging" / "rpm" / "oci-portfwd-hook.spec"
    result = subprocess.run(
        ["rpmlint", "-c", str(REPO / "packaging" / "rpm" / "rpmlint.toml"), str(built_rpm.path),
         str(spec)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if ": E: " in line or ": W: " in line]
    assert not [line for line in lines if ": E: " in line], "\n".join(lines)
    # Known and accepted (see the report in packaging/rpm/rpmlint.toml's header): no URL (there
    # is no upstream home page yet) and rpmlint 2.4's no-manual-page-for-binary false positive.
    # And the native programs unstripped: Debian's rpmbuild runs only brp-strip (strip -g, the
    # symbol table stays); Fedora's find-debuginfo strips it and makes the -debuginfo package.
    accepted = ("no-url-tag", "invalid-url Source0", "no-manual-page-for-binary oci-portfwd-hook",
                "no-manual-page-for-binary oci-portfwd-runtime",
                "unstripped-binary-or-object /usr/libexec/oci-portfwd-hook/portfwd-dialer",
                "unstripped-binary-or-object /usr/libexec/oci-portfwd-hook/portfwd-keeper",
                "unstripped-binary-or-object /usr/libexec/oci-portfwd-hook/portfwd_relay.abi3.so")
    assert not [line for line in lines if not any(a in line for a in accepted)], "\n".join(lines)
