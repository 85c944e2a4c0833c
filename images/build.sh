#!/usr/bin/env bash
# Builds Arbiter's two OCI images without a container engine, byte for byte reproducible:
#
#   arbiter-filter:VERSION         the wasm filter in the Wasm OCI image format, "compat"
#                                  variant (one tar+gzip layer holding `plugin.wasm`), which
#                                  Istio's WasmPlugin and Envoy Gateway's EnvoyExtensionPolicy
#                                  both pull
#   arbiter-policy-server:VERSION  the static policy server and the `arbiter` CLI, run as
#                                  uid/gid 65532, no shell, no libraries
#   arbiter-policy-server:VERSION-example
#                                  the same plus one layer: the example bundle in
#                                  /etc/arbiter/policies (demos, tests)
#
# Each goes to DIR/NAME/ (an OCI image layout) and DIR/NAME-VERSION.oci.tar (the layout as
# one file, skopeo's `oci-archive:`). Layers are written by GNU tar with fixed order, owners,
# modes and times (SOURCE_DATE_EPOCH, default 0) and `gzip -n`, so the same inputs give the
# same digests: an image's digest changes only when its content does. The digests are printed
# and written to DIR/digests.txt.
#
# Usage: images/build.sh --out DIR --version VERSION --wasm FILE --server FILE --cli FILE \
#                        --policies DIR
set -euo pipefail
shopt -s inherit_errexit

usage() {
    sed -n '/^# Usage:/,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

out="" version="" wasm="" server="" cli="" policies=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) out=$2 ;;
        --version) version=$2 ;;
        --wasm) wasm=$2 ;;
        --server) server=$2 ;;
        --cli) cli=$2 ;;
        --policies) policies=$2 ;;
        *) usage ;;
    esac
    shift 2 || usage
done
[[ -n $out && -n $version && -n $wasm && -n $server && -n $cli && -n $policies ]] || usage

fail() {
    echo "images/build.sh: $*" >&2
    exit 1
}
for tool in tar gzip sha256sum jq; do
    command -v "$tool" >/dev/null || fail "$tool is not installed (make image-tools)"
done
[[ -f $wasm ]] || fail "no wasm module at $wasm (make wasm)"
[[ $(head -c 4 "$wasm" | od -An -tx1 | tr -d ' ') == 0061736d ]] || fail "$wasm is not a wasm module"
for bin in "$server" "$cli"; do
    [[ -x $bin ]] || fail "no binary at $bin (make server-static)"
    # The server image has no dynamic loader: a binary that needs one would not start.
    if LC_ALL=C readelf --program-headers "$bin" | grep -q 'Requesting program interpreter'; then
        fail "$bin is dynamically linked (build it with -C target-feature=+crt-static: make server-static)"
    fi
done
[[ -d $policies ]] || fail "no policy bundle at $policies"
[[ $version =~ ^[0-9A-Za-z][0-9A-Za-z._-]{0,100}$ ]] || fail "version '$version' is not a valid image tag"

epoch=${SOURCE_DATE_EPOCH:-0}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
# The non-root user of the server image (distroless' "nonroot" uid).
uid=65532

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# tar_layer STAGING OUT.tar [PATH...]: a tar of STAGING's contents, sorted by name, owned by
# root, with the fixed time; the PATHs given (directories, relative to STAGING) are owned by
# the server's user instead.
tar_layer() {
    local staging=$1 tarball=$2
    shift 2
    local owned=("$@") list="$work/list"
    (cd "$staging" && find . -mindepth 1 -printf '%P\n') | LC_ALL=C sort >"$list"
    local fixed=(--format=gnu --numeric-owner --mtime="@$epoch" --no-recursion -C "$staging")
    grep -vxF -f <(printf '%s\n' "${owned[@]:-/}") "$list" |
        tar --create --file "$tarball" --owner=0 --group=0 "${fixed[@]}" --files-from=-
    if [[ ${#owned[@]} -gt 0 ]]; then
        tar --append --file "$tarball" --owner=$uid --group=$uid "${fixed[@]}" "${owned[@]}"
    fi
}

# add_blob LAYOUT FILE MEDIA-TYPE: stores FILE as a blob of LAYOUT; prints its descriptor.
add_blob() {
    local layout=$1 file=$2 media=$3 digest size
    digest=$(sha256sum "$file" | cut -d' ' -f1)
    size=$(stat -c %s "$file")
    mkdir -p "$layout/blobs/sha256"
    cp "$file" "$layout/blobs/sha256/$digest"
    jq -cn --arg m "$media" --arg d "sha256:$digest" --argjson s "$size" \
        '{mediaType: $m, digest: $d, size: $s}'
}

# add_layer LAYOUT TAR: gzips TAR into LAYOUT; prints "DIFF_ID DESCRIPTOR".
add_layer() {
    local layout=$1 tarball=$2
    local diff_id descriptor
    gzip -n -c "$tarball" >"$tarball.gz"
    diff_id=$(sha256sum "$tarball" | cut -d' ' -f1)
    descriptor=$(add_blob "$layout" "$tarball.gz" application/vnd.oci.image.layer.v1.tar+gzip)
    echo "sha256:$diff_id $descriptor"
}

# add_image LAYOUT CONFIG-JSON ANNOTATIONS-JSON LAYER...: the config (rootfs filled in from
# the layers, "DIFF_ID DESCRIPTOR" each) and the manifest; prints the manifest's descriptor.
add_image() {
    local layout=$1 config=$2 annotations=$3
    shift 3
    local diff_ids="[]" descriptors="[]" layer
    for layer in "$@"; do
        diff_ids=$(jq -c --arg d "${layer%% *}" '. + [$d]' <<<"$diff_ids")
        descriptors=$(jq -c --argjson d "${layer#* }" '. + [$d]' <<<"$descriptors")
    done
    jq -c --argjson ids "$diff_ids" '.rootfs = {type: "layers", diff_ids: $ids}' \
        <<<"$config" | tr -d '\n' >"$work/config.json"
    local config_descriptor
    config_descriptor=$(add_blob "$layout" "$work/config.json" application/vnd.oci.image.config.v1+json)
    jq -cn --argjson c "$config_descriptor" --argjson l "$descriptors" --argjson a "$annotations" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
          config: $c, layers: $l, annotations: $a}' | tr -d '\n' >"$work/manifest.json"
    add_blob "$layout" "$work/manifest.json" application/vnd.oci.image.manifest.v1+json
}

# finish_layout LAYOUT ARCHIVE "TAG DESCRIPTOR"...: index.json naming each manifest by its
# tag, the oci-layout marker, and the layout tarred into ARCHIVE.
finish_layout() {
    local layout=$1 archive=$2 manifests="[]" entry
    shift 2
    for entry in "$@"; do
        manifests=$(jq -c --arg t "${entry%% *}" --argjson d "${entry#* }" \
            '. + [$d + {annotations: {"org.opencontainers.image.ref.name": $t}}]' <<<"$manifests")
    done
    jq -cn --argjson m "$manifests" \
        '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests: $m}' |
        tr -d '\n' >"$layout/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
    (cd "$layout" && find . -mindepth 1 -printf '%P\n') | LC_ALL=C sort |
        tar --create --file "$archive" --format=gnu --numeric-owner --owner=0 --group=0 \
            --mtime="@$epoch" --no-recursion -C "$layout" --files-from=-
}

# OCI annotations shared by both images' manifests.
annotations() {
    jq -cn --arg title "$1" --arg description "$2" --arg v "$version" \
        '{"org.opencontainers.image.title": $title,
          "org.opencontainers.image.description": $description,
          "org.opencontainers.image.version": $v}'
}

summary=()

# --- arbiter-filter --------------------------------------------------------------------
filter_layout="$out/arbiter-filter"
rm -rf "$filter_layout"
mkdir -p "$work/filter"
install -m 0644 "$wasm" "$work/filter/plugin.wasm"
tar_layer "$work/filter" "$work/filter.tar"
filter_layer=$(add_layer "$filter_layout" "$work/filter.tar")
# GOARCH/GOOS-style platform of a wasip1 module; no runtime runs this image as a container.
filter_config=$(jq -cn --arg created "$created" \
    '{created: $created, architecture: "wasm", os: "wasip1", config: {},
      history: [{created: $created, created_by: "images/build.sh: plugin.wasm"}]}')
# The annotation the compat variant asks for when its layer has the OCI media type.
filter_annotations=$(annotations arbiter-filter "Arbiter proxy-wasm filter for Envoy (Istio WasmPlugin, Envoy Gateway EnvoyExtensionPolicy)")
filter_annotations=$(jq -c '. + {"module.wasm.image/variant": "compat"}' <<<"$filter_annotations")
filter_manifest=$(add_image "$filter_layout" "$filter_config" "$filter_annotations" "$filter_layer")
finish_layout "$filter_layout" "$out/arbiter-filter-$version.oci.tar" "$version $filter_manifest"
filter_digest=$(jq -r .digest <<<"$filter_manifest")
wasm_sha=$(sha256sum "$wasm" | cut -d' ' -f1)
summary+=("arbiter-filter:$version manifest $filter_digest")
summary+=("arbiter-filter:$version plugin.wasm sha256:$wasm_sha ($(stat -c %s "$wasm") bytes)")

# --- arbiter-policy-server ---------------------------------------------------------------
server_layout="$out/arbiter-policy-server"
rm -rf "$server_layout"
root="$work/server"
install -d -m 0755 "$root" "$root/etc" "$root/etc/arbiter" "$root/usr" "$root/usr/local" \
    "$root/usr/local/bin" "$root/var" "$root/var/lib"
# The audit log's default home; the only directory the server's user may write.
install -d -m 0700 "$root/var/lib/arbiter"
install -m 0755 "$server" "$root/usr/local/bin/arbiter-policy-server"
install -m 0755 "$cli" "$root/usr/local/bin/arbiter"
printf 'root:x:0:0:root:/root:/sbin/nologin\narbiter:x:%s:%s:arbiter:/var/lib/arbiter:/sbin/nologin\n' \
    $uid $uid >"$root/etc/passwd"
printf 'root:x:0:\narbiter:x:%s:\n' $uid >"$root/etc/group"
# The static glibc has the `files` and `dns` sources built in; nothing else is loadable.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
tar_layer "$root" "$work/server.tar" var/lib/arbiter
server_layer=$(add_layer "$server_layout" "$work/server.tar")

example="$work/example"
install -d -m 0755 "$example" "$example/etc" "$example/etc/arbiter" "$example/etc/arbiter/policies"
find "$policies" -maxdepth 1 -type f -exec install -m 0644 -t "$example/etc/arbiter/policies" {} +
tar_layer "$example" "$work/example.tar"
example_layer=$(add_layer "$server_layout" "$work/example.tar")

server_config() {
    jq -cn --arg created "$created" --arg user "$uid:$uid" --arg v "$version" --arg history "$1" \
        '{created: $created, architecture: "amd64", os: "linux",
          config: {
            User: $user,
            Entrypoint: ["/usr/local/bin/arbiter-policy-server"],
            Env: ["PATH=/usr/local/bin",
                  "ARBITER_LISTEN=0.0.0.0:50051",
                  "ARBITER_POLICIES=/etc/arbiter/policies"],
            WorkingDir: "/var/lib/arbiter",
            ExposedPorts: {"50051/tcp": {}},
            Labels: {"org.opencontainers.image.version": $v}
          },
          history: ([{created: $created, created_by: "images/build.sh: arbiter-policy-server, arbiter"}]
            + (if $history == "" then [] else [{created: $created, created_by: $history}] end))}'
}
description="Arbiter policy server (Envoy ext_authz, Cedar) and the arbiter CLI"
config=$(server_config "")
labels=$(annotations arbiter-policy-server "$description")
server_manifest=$(add_image "$server_layout" "$config" "$labels" "$server_layer")
config=$(server_config "images/build.sh: example bundle in /etc/arbiter/policies")
labels=$(annotations arbiter-policy-server "$description; example bundle in /etc/arbiter/policies")
example_manifest=$(add_image "$server_layout" "$config" "$labels" "$server_layer" "$example_layer")
finish_layout "$server_layout" "$out/arbiter-policy-server-$version.oci.tar" \
    "$version $server_manifest" "$version-example $example_manifest"
summary+=("arbiter-policy-server:$version manifest $(jq -r .digest <<<"$server_manifest")")
summary+=("arbiter-policy-server:$version-example manifest $(jq -r .digest <<<"$example_manifest")")

printf '%s\n' "${summary[@]}" >"$out/digests.txt"
printf '%s\n' "${summary[@]}"
echo "layouts: $filter_layout $server_layout"
echo "archives: $out/arbiter-filter-$version.oci.tar $out/arbiter-policy-server-$version.oci.tar"
echo "Istio WasmPlugin / Envoy Gateway EnvoyExtensionPolicy: url .../arbiter-filter:$version (or @$filter_digest), sha256: ${filter_digest#sha256:}"
