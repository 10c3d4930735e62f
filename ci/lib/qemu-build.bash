# Sourced (not run) by ci/build-qemu and ci/check-qemu-series, so that the series is checked
# exactly the way it is built: the pristine tree and tarball, the patches, the build
# dependencies, the firmware stubs and the configure options live only here.
# The caller sets `top` (the repository) and `cache`; log lines carry the caller's name.
# shellcheck disable=SC2034 # src, tarball, patches and venv are for the caller

: "${top:?set by the caller}" "${cache:?set by the caller}"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# Sets src (the unpacked pristine tree), tarball and patches (qemu-patches/*.patch, in order).
qemu_series_inputs() {
    src=$("$top/ci/fetch-qemu-source")
    tarball=$(find "$cache/qemu-src" -maxdepth 1 -name 'qemu_*.orig.tar.xz' | sort | tail -n 1)
    [ -n "$tarball" ] || { log "no QEMU source tarball in $cache/qemu-src"; exit 1; }
    mapfile -t patches < <(find "$top/qemu-patches" -maxdepth 1 -name '*.patch' | sort)
    [ "${#patches[@]}" -gt 0 ] || { log "no patches in $top/qemu-patches"; exit 1; }
}

# qemu_apply_patch TREE PATCH [PATCH_OPTION...]
qemu_apply_patch() {
    patch -d "$1" -p1 --batch --forward --quiet "${@:3}" <"$2"
}

qemu_build_deps() {
    local deps=(ninja-build libglib2.0-dev libpixman-1-dev flex bison pkg-config libslirp-dev
                libfdt-dev zlib1g-dev python3-venv patch bzip2 gcc make seabios)
    local missing=() p
    for p in "${deps[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' ||
            missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >&2
    fi
}

# Sets venv: configure runs meson from the Python it is given; the +ds tarball bundles no wheels.
qemu_build_venv() {
    venv="$cache/qemu-build-venv"
    if ! "$venv/bin/python3" -c 'import mesonbuild, pycotap' 2>/dev/null; then
        log "creating $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q meson==1.5.0 pycotap==1.3.1 >&2
    fi
}

# qemu_configure TREE BUILD_DIR: configure for qemu-system-x86_64 (TCG, no docs or GUI).
qemu_configure() {
    local tree=$1 build=$2 fd
    # Debian's +ds tarball drops the firmware blobs; meson still wants the edk2 archives.
    while read -r fd; do
        [ -f "$tree/pc-bios/$fd.bz2" ] || bzip2 -c </dev/null >"$tree/pc-bios/$fd.bz2"
    done < <(sed -n "s/^ *'\(edk2-[a-z0-9_-]*\.fd\)',\$/\1/p" "$tree/pc-bios/meson.build")
    mkdir "$build"
    log "configuring (log: $build/configure.log)"
    if ! (cd "$build" && nice "$tree/configure" --python="$venv/bin/python3" \
            --target-list=x86_64-softmmu --disable-docs --disable-werror --disable-gtk \
            --disable-sdl --disable-vnc --disable-spice --disable-opengl \
            --disable-virglrenderer --disable-curses --disable-plugins \
            --disable-install-blobs >configure.log 2>&1); then
        tail -n 30 "$build/configure.log" >&2
        log "configure failed"
        exit 1
    fi
}

# qemu_ninja BUILD_DIR LOG: (re)build qemu-system-x86_64; returns non-zero with the log's
# tail on stderr when the build fails.
qemu_ninja() {
    local build=$1 ninja_log=$2
    if ! nice ninja -C "$build" qemu-system-x86_64 >"$ninja_log" 2>&1; then
        tail -n 40 "$ninja_log" >&2
        return 1
    fi
}
