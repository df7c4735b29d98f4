#!/usr/bin/env bash
# Builds the crate from a folder holding only what docker/Dockerfile's
# builder stage copies (its COPY lines, without --from), so a file the build
# needs but the image never receives (an include_str! of web/, a migration)
# fails here rather than in `docker build`. No container engine is needed.
#
# The build shares this checkout's target folder: only the crate itself is
# compiled again (its library, where every compile-time include lives).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dockerfile=docker/Dockerfile
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT

# The builder stage: from the first FROM to the next one.
stage=$(awk '/^FROM /{n++} n==1' "$dockerfile")
workdir=$(printf '%s\n' "$stage" | awk '$1=="WORKDIR"{print $2}' | tail -n 1)
[ -n "$workdir" ] || { echo "no WORKDIR in the builder stage of $dockerfile" >&2; exit 1; }

copies=0
while read -r line; do
    # COPY src... dest (flags such as --chown are skipped; --from is another stage)
    read -r -a words <<<"${line#COPY }"
    args=()
    for word in "${words[@]}"; do
        case "$word" in
            --from=*) args=(); break ;;
            --*) ;;
            *) args+=("$word") ;;
        esac
    done
    [ "${#args[@]}" -ge 2 ] || continue
    dest=${args[-1]}
    unset 'args[-1]'
    case "$dest" in
        /*) target="$context${dest#"$workdir"}" ;;
        *) target="$context/$dest" ;;
    esac
    for source in "${args[@]}"; do
        if [ -d "$source" ]; then
            mkdir -p "$target"
            cp -a "$source/." "$target/"
        elif [[ "$dest" == */ || "${#args[@]}" -gt 1 ]]; then
            mkdir -p "$target"
            cp -a "$source" "$target/"
        else
            mkdir -p "$(dirname "$target")"
            cp -a "$source" "$target"
        fi
        copies=$((copies + 1))
    done
done < <(printf '%s\n' "$stage" | grep -E '^COPY ')
[ "$copies" -gt 0 ] || { echo "no COPY lines found in $dockerfile" >&2; exit 1; }

echo "building the crate from what $dockerfile copies: $(cd "$context" && ls -A | tr '\n' ' ')"
# As the Dockerfile's ENV says: queries are checked against the copied .sqlx/.
(cd "$context" && SQLX_OFFLINE=true CARGO_TARGET_DIR="$root/target" cargo build --locked --lib --quiet)
echo "the Docker build context holds everything the crate needs"
