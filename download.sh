#!/usr/bin/env bash
# download.sh -- download the Llama 2 weights and tokenizer with the signed URL
# that Meta sends by email after you accept the Llama 2 Community License.
#
# Interactive:      ./download.sh
# Non-interactive:  PRESIGNED_URL='https://...*...' MODEL_SIZE=7B,13B-chat \
#                   TARGET_FOLDER=/data/llama ./download.sh
#
# Environment (all optional):
#   PRESIGNED_URL        the URL from the email (it contains a '*'). When set,
#                        the script asks nothing.
#   MODEL_SIZE           comma-separated models: 7B,13B,70B,7B-chat,13B-chat,
#                        70B-chat (any case). Empty, unset or "all" = all six.
#   TARGET_FOLDER        where to put everything (default: current directory).
#   DOWNLOADER           wget or curl (default: wget if installed, else curl).
#   MD5TOOL              md5sum or md5 (default: md5sum if installed, else md5).
#   DOWNLOAD_TRIES       attempts per file on network errors (default 3).
#   DOWNLOAD_RETRY_WAIT  seconds between attempts (default 5).
#
# Every file is downloaded to NAME.part (resumable), checked, and only renamed
# to NAME once the whole model folder matches its checklist.
#
# Exit status: 0 success; 1 a download or checksum failed; 2 bad input or a
# required tool is missing; 130 interrupted.  See docs/download.md.

set -Eeuo pipefail

readonly VALID_MODELS="7B, 13B, 70B, 7B-chat, 13B-chat, 70B-chat"
readonly REQUEST_PAGE="https://ai.meta.com/resources/models-and-libraries/llama-downloads/"
# "<md5>  <name>" (md5sum), "<md5> *<name>" (binary mode) or "<md5> <name>" (md5 -r)
readonly CHECKLIST_RE='^([0-9a-fA-F]{32}) ([ *]?)(.+)$'
readonly WGET_ERROR_RE='ERROR ([0-9][0-9][0-9])'

TMP_DIR=""

# ---------------------------------------------------------------- messages --

say() { printf '%s\n' "$*"; }

# err LINE... : print an error; the first line gets "ERROR: ", the rest are indented.
err() {
    local first=1 line
    for line in "$@"; do
        if [ "$first" = 1 ]; then
            printf 'ERROR: %s\n' "$line" >&2
            first=0
        else
            printf '       %s\n' "$line" >&2
        fi
    done
}

die() { err "$@"; exit 1; }        # download / verification failures
die_usage() { err "$@"; exit 2; }  # bad input, missing tools

new_link_advice() {
    printf '%s\n' \
        "Request a new link at $REQUEST_PAGE" \
        "(links expire after 24 hours and a limited number of downloads)." \
        "When you paste it, copy the link text shown in the email itself, not the" \
        "link target (\"Copy link address\"): email clients often rewrite the target."
}

on_exit() {
    if [ -n "$TMP_DIR" ] && [ -d "$TMP_DIR" ]; then
        rm -rf "$TMP_DIR"
    fi
}

on_error() {
    local rc=$1 line=$2
    err "download.sh stopped unexpectedly (exit status $rc at line $line)." \
        "Partial downloads are kept as *.part files; run download.sh again with the" \
        "same settings to resume. If this keeps happening, please report it."
    exit 1
}

on_interrupt() {
    printf '\n' >&2
    err "Interrupted. Partial downloads are kept as *.part files;" \
        "run download.sh again with the same settings to resume."
    exit 130
}

trap on_exit EXIT
trap 'on_error $? $LINENO' ERR
trap on_interrupt INT TERM

# ------------------------------------------------------------------- tools --

have() { command -v "$1" >/dev/null 2>&1; }

check_tools() {
    local missing=() t
    case "${DOWNLOADER:-}" in
        "")
            if have wget; then DL=wget
            elif have curl; then DL=curl
            else missing+=("wget or curl (to download; e.g. 'apt-get install wget' or 'brew install wget')")
            fi ;;
        wget | curl)
            DL=$DOWNLOADER
            have "$DL" || missing+=("$DL (requested with DOWNLOADER=$DL)") ;;
        *)
            die_usage "DOWNLOADER must be 'wget' or 'curl', not '$DOWNLOADER'." ;;
    esac
    case "${MD5TOOL:-}" in
        "")
            if have md5sum; then MD5=md5sum
            elif have md5; then MD5=md5
            else missing+=("md5sum or md5 (to verify checksums; md5sum is in GNU coreutils, md5 ships with macOS)")
            fi ;;
        md5sum | md5)
            MD5=$MD5TOOL
            have "$MD5" || missing+=("$MD5 (requested with MD5TOOL=$MD5)") ;;
        *)
            die_usage "MD5TOOL must be 'md5sum' or 'md5', not '$MD5TOOL'." ;;
    esac
    for t in head tr mv rm mkdir mktemp tee sleep wc; do
        have "$t" || missing+=("$t")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        err "download.sh needs these programs, which were not found on PATH:"
        for t in "${missing[@]}"; do printf '         - %s\n' "$t" >&2; done
        exit 2
    fi
}

# ------------------------------------------------------------------- input --

trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

lower() { printf '%s' "$1" | LC_ALL=C tr '[:upper:]' '[:lower:]'; }

is_count() { case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# prompt TEXT: print TEXT, read one line from stdin into REPLY ("" at end of input).
prompt() {
    printf '%s' "$1" >&2
    REPLY=""
    IFS= read -r REPLY || true
}

read_inputs() {
    URL=${PRESIGNED_URL:-}
    MODELS_RAW=${MODEL_SIZE:-}
    if [ -z "$URL" ]; then
        prompt "Enter the URL from email: "
        URL=$REPLY
        if [ -z "${MODEL_SIZE+set}" ]; then
            prompt "Enter the list of models to download ($VALID_MODELS), separated by commas, or press Enter for all: "
            MODELS_RAW=$REPLY
        fi
    fi
    TARGET=${TARGET_FOLDER:-.}
    TRIES=${DOWNLOAD_TRIES:-3}
    WAIT=${DOWNLOAD_RETRY_WAIT:-5}
    if ! is_count "$TRIES" || [ "$TRIES" -lt 1 ]; then
        die_usage "DOWNLOAD_TRIES must be a whole number of at least 1, not '$TRIES'."
    fi
    is_count "$WAIT" || die_usage "DOWNLOAD_RETRY_WAIT must be a whole number of seconds, not '$WAIT'."
}

validate_url() {
    URL=$(trim "$URL")
    # Tolerate the URL being pasted with quotes or angle brackets around it.
    case "$URL" in
        \"*\") URL=${URL#\"}; URL=${URL%\"} ;;
        \'*\') URL=${URL#\'}; URL=${URL%\'} ;;
        \<*\>) URL=${URL#<}; URL=${URL%>} ;;
    esac
    if [ -z "$URL" ]; then
        die_usage "No URL given." \
            "Run download.sh again and paste the URL from the email when asked," \
            "or set PRESIGNED_URL='https://...' (quote it: it contains '*' and '&')."
    fi
    case "$URL" in
        http://* | https://*) ;;
        *) die_usage "The URL must start with https:// (got '$URL')." \
            "Paste the whole URL from the email, starting with https://." ;;
    esac
    case "$URL" in
        *'*'*) ;;
        *)
            err "The URL has no '*' in it, so it cannot be the download URL from the email." \
                "The email's URL contains a '*' where each file's name goes."
            case "$URL" in
                *%2A* | *%2a* | *safelinks* | *urldefense* | *l.facebook.com* | *mandrillapp* | *sendgrid*)
                    err "This looks like a link target rewritten by your email client." ;;
            esac
            new_link_advice >&2
            exit 2 ;;
    esac
    URL_HEAD=${URL%%'*'*}   # everything before the first '*'
    URL_TAIL=${URL#*'*'}    # everything after it (the signature)
}

# parse_models RAW: fills MODEL_DIRS and MODEL_SHARDS, or exits listing valid names.
parse_models() {
    local raw item key dir d n bad=() items=() seen
    raw=$(trim "$1")
    if [ -z "$raw" ] || [ "$(lower "$raw")" = all ]; then
        raw="7B,13B,70B,7B-chat,13B-chat,70B-chat"
    fi
    raw=${raw//[[:space:]]/,}   # spaces work as separators too
    IFS=',' read -r -a items <<<"$raw"
    MODEL_DIRS=()
    MODEL_SHARDS=()
    for item in ${items[@]+"${items[@]}"}; do
        [ -n "$item" ] || continue
        key=$(lower "$item")
        case "$key" in
            7b) dir=llama-2-7b n=1 ;;
            13b) dir=llama-2-13b n=2 ;;
            70b) dir=llama-2-70b n=8 ;;
            7b-chat) dir=llama-2-7b-chat n=1 ;;
            13b-chat) dir=llama-2-13b-chat n=2 ;;
            70b-chat) dir=llama-2-70b-chat n=8 ;;
            *) bad+=("$item"); continue ;;
        esac
        seen=0
        if [ "${#MODEL_DIRS[@]}" -gt 0 ]; then
            for d in "${MODEL_DIRS[@]}"; do [ "$d" = "$dir" ] && seen=1; done
        fi
        if [ "$seen" = 0 ]; then
            MODEL_DIRS+=("$dir")
            MODEL_SHARDS+=("$n")
        fi
    done
    if [ "${#bad[@]}" -gt 0 ]; then
        die_usage "Unknown model name(s): ${bad[*]}" \
            "Valid names: $VALID_MODELS (case does not matter)." \
            "Separate names with commas, e.g. MODEL_SIZE=7B,13B-chat; leave it empty for all." \
            "Nothing was downloaded."
    fi
    if [ "${#MODEL_DIRS[@]}" -eq 0 ]; then
        die_usage "No model names given. Valid names: $VALID_MODELS."
    fi
}

# --------------------------------------------------------------- download --

# run_downloader URL FILE: one attempt, resuming FILE if it exists.
# Sets DL_RC (the tool's exit status) and HTTP_STATUS (last HTTP code, or "").
run_downloader() {
    local url=$1 out=$2 log="$TMP_DIR/downloader.log" line
    local -a opts
    HTTP_STATUS=""
    : >"$log"
    # (run inside `if` so that a failure is ours to handle, not the ERR trap's)
    if [ "$DL" = wget ]; then
        opts=(--continue --tries=1 --timeout=60)
        if [ -t 2 ]; then opts+=(--progress=bar:force:noscroll); else opts+=(--progress=dot:giga); fi
        if wget "${opts[@]}" -O "$out" -- "$url" 2>&1 | tee "$log" >&2; then
            DL_RC=0
        else
            DL_RC=${PIPESTATUS[0]}
        fi
        while IFS= read -r line; do
            if [[ $line =~ $WGET_ERROR_RE ]]; then HTTP_STATUS=${BASH_REMATCH[1]}; fi
        done <"$log"
    else
        opts=(--fail --location --continue-at - --connect-timeout 30 --speed-limit 1 --speed-time 60)
        if [ -t 2 ]; then opts+=(--progress-bar); else opts+=(--silent --show-error); fi
        if HTTP_STATUS=$(curl "${opts[@]}" --output "$out" --write-out '%{http_code}' "$url"); then
            DL_RC=0
        else
            DL_RC=$?
        fi
        [ "$HTTP_STATUS" != 000 ] || HTTP_STATUS=""
    fi
    return 0
}

file_size() { if [ -f "$1" ]; then wc -c <"$1" | tr -d ' '; else printf 0; fi; }

# looks_like_html FILE: true if FILE starts like an HTML or XML page.
looks_like_html() {
    local start
    start=$(head -c 512 "$1" 2>/dev/null | LC_ALL=C tr -d '\000' | LC_ALL=C tr '\t\r\n' '   ' |
        LC_ALL=C tr '[:upper:]' '[:lower:]') || true
    start=${start#$'\xef\xbb\xbf'}
    start=${start#"${start%%[! ]*}"}
    case "$start" in
        '<!doctype'* | '<html'* | '<?xml'* | '<head'* | '<body'* | '<error'*) return 0 ;;
    esac
    return 1
}

# fetch REMOTE OUT: download REMOTE (path relative to the '*') into OUT,
# resuming OUT if present. Exits with a clear message on any failure.
fetch() {
    local remote=$1 out=$2 url attempt=1
    url="${URL_HEAD}${remote}${URL_TAIL}"
    say "Downloading $remote"
    while :; do
        run_downloader "$url" "$out"
        if [ "$DL_RC" = 0 ]; then
            break
        fi
        # wget leaves an empty file behind on HTTP errors; don't keep it.
        if [ -f "$out" ] && [ "$(file_size "$out")" = 0 ]; then rm -f "$out"; fi
        case "$HTTP_STATUS" in
            416)
                # Range not satisfiable: OUT is already complete (curl reports this as an error).
                if [ "$(file_size "$out")" -gt 0 ]; then break; fi ;;
            401 | 403)
                err "The server refused $remote (HTTP $HTTP_STATUS): the download link has expired or is not valid."
                new_link_advice >&2
                err "Then run download.sh again; files already downloaded are kept."
                exit 1 ;;
            404 | 410)
                err "The server has no file $remote (HTTP $HTTP_STATUS)." \
                    "The URL was probably cut short or changed when it was copied: copy the whole" \
                    "URL text from the email (it contains '*'), not the link target."
                new_link_advice >&2
                exit 1 ;;
            4[0-9][0-9])
                err "The server rejected the request for $remote (HTTP $HTTP_STATUS)."
                new_link_advice >&2
                exit 1 ;;
        esac
        if [ "$DL" = curl ] && [ "$DL_RC" = 33 ]; then
            say "The server cannot resume $remote; starting it again from the beginning."
            rm -f "$out"
        fi
        if [ "$attempt" -ge "$TRIES" ]; then
            if [ -n "$HTTP_STATUS" ]; then
                err "Downloading $remote failed: the server answered HTTP $HTTP_STATUS ($attempt attempt(s))."
            else
                err "Downloading $remote failed: network error ($DL exit status $DL_RC, $attempt attempt(s))."
            fi
            if [ -f "$out" ]; then
                err "The $(file_size "$out") bytes received so far are kept in $out." \
                    "Run download.sh again with the same settings to resume from there."
            else
                err "Check your network connection and run download.sh again."
            fi
            exit 1
        fi
        attempt=$((attempt + 1))
        say "Retrying $remote in ${WAIT}s (attempt $attempt of $TRIES)..."
        sleep "$WAIT"
    done
    if looks_like_html "$out"; then
        rm -f "$out"
        err "The server sent a web page (HTML) instead of $remote; it was not saved." \
            "This happens when the link has expired or the URL was changed on the way."
        new_link_advice >&2
        exit 1
    fi
}

# fetch_plain NAME: a top-level file without a checksum (LICENSE, USE_POLICY.md).
fetch_plain() {
    local name=$1 out="$TARGET/$1"
    rm -f "$out.part"
    fetch "$name" "$out.part"
    mv -f "$out.part" "$out"
}

# ------------------------------------------------------------------ verify --

# checklist_sum CHECKLIST NAME: print NAME's md5 (lower case) from CHECKLIST.
checklist_sum() {
    local want=$2 line name
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        if [[ $line =~ $CHECKLIST_RE ]]; then
            name=${BASH_REMATCH[3]}
            name=${name#./}
            if [ "$name" = "$want" ]; then
                lower "${BASH_REMATCH[1]}"
                return 0
            fi
        fi
    done <"$1"
    return 1
}

# check_checklist FILE LABEL: FILE must be a well-formed checklist.
check_checklist() {
    local file=$1 label=$2 line n=0 entries=0 badline=0
    while IFS= read -r line || [ -n "$line" ]; do
        n=$((n + 1))
        line=${line%$'\r'}
        [ -n "$(trim "$line")" ] || continue
        if [[ $line =~ $CHECKLIST_RE ]]; then
            entries=$((entries + 1))
        else
            badline=$n
            break
        fi
    done <"$file"
    if [ "$badline" != 0 ]; then
        rm -f "$file"
        err "$label is not a valid checklist (line $badline is not '<md5>  <file name>')."
        new_link_advice >&2
        exit 1
    fi
    if [ "$entries" = 0 ]; then
        rm -f "$file"
        err "$label is empty."
        new_link_advice >&2
        exit 1
    fi
}

# md5_check DIR EXPECTED FILE: compare FILE (relative to DIR) with EXPECTED.
# Prints "FILE: OK" or "FILE: FAILED"; returns 1 on mismatch.
md5_check_macos() {
    local dir=$1 want=$2 file=$3 got
    got=$(cd "$dir" && md5 -r "./$file") || got=""
    got=$(lower "${got%% *}")
    if [ -n "$got" ] && [ "$got" = "$want" ]; then
        say "$file: OK"
    else
        say "$file: FAILED"
        return 1
    fi
}

# get_group DIR PREFIX CHECKLIST FILE...: download the CHECKLIST and FILEs of
# one folder (PREFIX is their path on the server), verify, then rename.
get_group() {
    local dir=$1 prefix=$2 chk=$3
    shift 3
    local chk_part="$dir/$chk.part" f sum ondisk out line
    local -a sums=() ondisks=() failed=()
    mkdir -p "$dir"

    rm -f "$chk_part"
    fetch "$prefix$chk" "$chk_part"
    check_checklist "$chk_part" "$prefix$chk"
    for f in "$@"; do
        if ! sum=$(checklist_sum "$chk_part" "$f"); then
            rm -f "$chk_part"
            die "$prefix$chk does not list $f, so it could not be verified; nothing was downloaded for it." \
                "The files on the server look incomplete; request a new link and try again later."
        fi
        sums+=("$sum")
    done

    for f in "$@"; do
        if [ -f "$dir/$f" ] && [ ! -f "$dir/$f.part" ]; then
            say "Found $prefix$f from an earlier run; it will be checked again."
            ondisks+=("$f")
        else
            fetch "$prefix$f" "$dir/$f.part"
            ondisks+=("$f.part")
        fi
    done

    say "Checking checksums in ${dir} ..."
    local i=0
    if [ "$MD5" = md5sum ]; then
        local input=""
        for f in "$@"; do
            input+="${sums[$i]}  ${ondisks[$i]}"$'\n'
            i=$((i + 1))
        done
        out=$(cd "$dir" && printf '%s' "$input" | md5sum -c - 2>&1) || true
        say "$out"
        i=0
        for f in "$@"; do
            local ok=0
            while IFS= read -r line; do
                [ "$line" = "${ondisks[$i]}: OK" ] && ok=1
            done <<<"$out"
            [ "$ok" = 1 ] || failed+=("$i")
            i=$((i + 1))
        done
    else
        for f in "$@"; do
            md5_check_macos "$dir" "${sums[$i]}" "${ondisks[$i]}" || failed+=("$i")
            i=$((i + 1))
        done
    fi

    if [ "${#failed[@]}" -gt 0 ]; then
        local names=() idx
        for idx in "${failed[@]}"; do
            names+=("$prefix${ondisks[$idx]%.part}")
        done
        err "Checksum did NOT match for: ${names[*]}"
        for idx in "${failed[@]}"; do
            ondisk=${ondisks[$idx]}
            case "$ondisk" in
                *.part)
                    rm -f "$dir/$ondisk"
                    err "$prefix${ondisk%.part} was corrupted in transit and has been deleted." ;;
                *)
                    err "$dir/$ondisk (from an earlier download) does not match; delete it." ;;
            esac
        done
        err "No file of $dir was moved into place. Run download.sh again to fetch the" \
            "bad file(s) again (the good ones are kept as .part files and not re-downloaded)." \
            "If the mismatch persists, request a new link: $REQUEST_PAGE"
        exit 1
    fi

    # Everything matches: move the files into place, checklist last.
    for f in "$@"; do
        if [ -f "$dir/$f.part" ]; then mv -f "$dir/$f.part" "$dir/$f"; fi
    done
    mv -f "$chk_part" "$dir/$chk"
}

# check_target DIR: refuse to overwrite this project's own LICENSE and
# USE_POLICY.md (the default TARGET_FOLDER "." is the repository root when
# download.sh is run from a checkout).
check_target() {
    local first=""
    if [ -f "$1/LICENSE" ]; then
        IFS= read -r first <"$1/LICENSE" || true
    fi
    if [ "${first%$'\r'}" = "MIT License" ]; then
        die_usage "'$1' holds this project's own LICENSE (MIT); it looks like the repository root." \
            "download.sh saves Meta's Llama 2 license there as LICENSE (and the use policy as" \
            "USE_POLICY.md), which would overwrite the project's files. Choose another folder," \
            "e.g.  TARGET_FOLDER=weights ./download.sh" \
            "Nothing was downloaded."
    fi
}

# -------------------------------------------------------------------- main --

main() {
    check_tools
    read_inputs
    validate_url
    parse_models "$MODELS_RAW"

    case "$TARGET" in -*) TARGET="./$TARGET" ;; esac
    check_target "$TARGET"
    mkdir -p "$TARGET" || die_usage "Cannot create TARGET_FOLDER '$TARGET'."
    TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-download.XXXXXX")

    say "Downloading into '$TARGET': LICENSE, USE_POLICY.md, tokenizer and ${MODEL_DIRS[*]} (using $DL, $MD5)"

    fetch_plain LICENSE
    fetch_plain USE_POLICY.md
    get_group "$TARGET" "" tokenizer_checklist.chk tokenizer.model
    say "tokenizer.model: verified"

    local i=0 dir n s files
    for dir in "${MODEL_DIRS[@]}"; do
        n=${MODEL_SHARDS[$i]}
        files=()
        s=0
        while [ "$s" -lt "$n" ]; do
            files+=("$(printf 'consolidated.%02d.pth' "$s")")
            s=$((s + 1))
        done
        files+=(params.json)
        get_group "$TARGET/$dir" "$dir/" checklist.chk "${files[@]}"
        say "$dir: verified"
        i=$((i + 1))
    done
    say "Done. All files are in '$TARGET' and match their checklists."
}

main "$@"
