# Shared install steps for scripts/test and scripts/demo; source it from the repo root.
# Installs, when missing: Debian's rabbitmq-server (without starting a system broker),
# Debian's chromium and chromium-driver (the dashboard's browser test), a virtualenv at
# .venv, and rbit itself with its test extras (editable).

RBIT_VENV=${RBIT_VENV:-.venv}
_apt_updated=

_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "error: '$*' needs root (no sudo here)" >&2
        return 1
    fi
}

_apt_install() {
    if [ -z "$_apt_updated" ]; then
        _as_root apt-get update -qq
        _apt_updated=1
    fi
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

have_rabbitmq() {
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1
}

ensure_rabbitmq() {
    have_rabbitmq && return 0
    echo "==> installing rabbitmq-server (Debian package)"
    # Keep the package's postinst from starting a system-wide broker on 5672: our nodes
    # are private, on their own ports. policy-rc.d exit 101 = "action forbidden".
    local policy=/usr/sbin/policy-rc.d added=
    if [ ! -e "$policy" ]; then
        _as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added=1
    fi
    local rc=0
    _apt_install rabbitmq-server || rc=$?
    [ -n "$added" ] && _as_root rm -f "$policy"
    return $rc
}

have_chromium() {
    command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1
}

ensure_chromium() {
    have_chromium && return 0
    echo "==> installing chromium and chromium-driver (Debian packages)"
    _apt_install chromium chromium-driver
}

ensure_venv() {
    if ! "$RBIT_VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        echo "==> creating virtualenv $RBIT_VENV"
        rm -rf "$RBIT_VENV"
        if ! python3 -m venv "$RBIT_VENV" >/dev/null 2>&1; then
            # Debian splits venv/ensurepip into python3-venv.
            rm -rf "$RBIT_VENV"
            _apt_install python3-venv
            python3 -m venv "$RBIT_VENV"
        fi
    fi
    # Reinstall only when packaging or the package list changed: the editable install
    # maps top-level packages, so new modules inside them need nothing.
    local stamp="$RBIT_VENV/.rbit-install-stamp" want
    want=$(cat setup.py pyproject.toml 2>/dev/null; find rbit rbitext -name __init__.py 2>/dev/null | sort)
    want=$(printf '%s' "$want" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "==> installing rbit and its test dependencies into $RBIT_VENV"
        "$RBIT_VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
        echo "$want" > "$stamp"
    fi
}
