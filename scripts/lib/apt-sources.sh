# apt-sources.sh: where the host's apt configuration fetches Debian from, so that scripts that
# debootstrap use the host's own mirror (an air-gapped host's local one) and the tree names none.
# Sourced by bootstrap-base-image.sh and build-onefile.sh; reads $APT_ETC (default /etc/apt) and
# $OS_RELEASE (default /etc/os-release); sets no shell options.

# The first enabled `deb` source in the host's apt configuration that serves suite $1 with the
# main component: one-line entries (`deb [options] URI SUITE COMPONENT...`) and deb822 stanzas.
apt_source_for() {
    local etc=${APT_ETC:-/etc/apt} files=() file
    [ -f "$etc/sources.list" ] && files+=("$etc/sources.list")
    for file in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
        [ -f "$file" ] && files+=("$file")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v want="$1" '
        function serves(suites, components,   n, i, s, m, j, c) {
            n = split(suites, s, /[ \t]+/); m = split(components, c, /[ \t]+/)
            for (i = 1; i <= n; i++) if (s[i] == want) for (j = 1; j <= m; j++) if (c[j] == "main") return 1
            return 0
        }
        function stanza_end() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && serves(suites, comps) && uris != "") {
                split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
            }
            types = ""; uris = ""; suites = ""; comps = ""; enabled = ""
        }
        FNR == 1 { stanza_end() }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { stanza_end(); next }
            if ($0 ~ /^#/) next
            key = tolower($1); sub(/:$/, "", key); value = $0; sub(/^[^:]*:[ \t]*/, "", value)
            if (key == "types") types = value; else if (key == "uris") uris = value
            else if (key == "suites") suites = value; else if (key == "components") comps = value
            else if (key == "enabled") enabled = tolower(value)
            next
        }
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            uri = $i; suite = $(i + 1); rest = ""
            for (j = i + 2; j <= NF; j++) rest = rest " " $j
            if (serves(suite, rest)) { print uri; found = 1; exit }
        }
        END { if (!found) stanza_end() }
    ' "${files[@]}"
}

# The mirror for suite $1 (SUITE or SUITE-POCKET): the host's source for it, or else the one for
# the same pocket of the host's own release (/etc/os-release's VERSION_CODENAME), since a Debian
# archive carries every release it still serves. Empty when neither is configured.
apt_mirror_for() {
    local uri
    uri=$(apt_source_for "$1")
    if [ -z "$uri" ]; then
        local codename pocket=""
        codename=$(sed -n 's/^VERSION_CODENAME=//p' "${OS_RELEASE:-/etc/os-release}" 2>/dev/null | tr -d '"' | head -n 1)
        case $1 in *-*) pocket=-${1#*-} ;; esac
        [ -z "$codename" ] || uri=$(apt_source_for "$codename$pocket")
    fi
    printf '%s' "$uri"
}
