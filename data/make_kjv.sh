#!/bin/sh
# Regenerates data/kjv.txt from Debian's bible-kjv-text package (see data/README.md).
# The package stores the text in the BRS compressed format; the `bible` reader from the
# bible-kjv package (same version) decodes it. Needs apt-get (download only, no install).
# Usage: sh data/make_kjv.sh [out=data/kjv.txt]
set -eu
out=${1:-data/kjv.txt}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download bible-kjv-text=4.38 bible-kjv=4.38 >/dev/null)
dpkg -x "$tmp"/bible-kjv-text_4.38_all.deb "$tmp/text"
dpkg -x "$tmp"/bible-kjv_4.38_*.deb "$tmp/reader"
# -f: pretty-printing off, i.e. one verse per line as "Ge1:1 In the beginning ...".
"$tmp/reader/usr/bin/bible" -f -p "$tmp/text/usr/lib" Gen1:1-Ex40:38 > "$tmp/raw.txt"
# Drop the reference prefix; start each chapter with a blank line and a "Genesis 1" heading.
awk '
  match($0, /^[A-Za-z]+[0-9]+:[0-9]+ /) {
    ref = substr($0, 1, RLENGTH - 1); text = substr($0, RLENGTH + 1)
    book = ref; sub(/[0-9].*/, "", book)
    name = (book == "Ge") ? "Genesis" : (book == "Exo") ? "Exodus" : book
    chapter = ref; sub(/^[A-Za-z]+/, "", chapter); sub(/:.*/, "", chapter)
    if (name != last_name || chapter != last_chapter) {
      if (NR > 1) print ""
      print name " " chapter; print ""
      last_name = name; last_chapter = chapter
    }
    print text; next
  }
  { print "unexpected line " NR ": " $0 > "/dev/stderr"; exit 1 }
' "$tmp/raw.txt" > "$out"
# Plain printable ASCII plus newlines only.
if LC_ALL=C grep -q '[^ -~]' "$out"; then echo "non-ASCII byte in $out" >&2; exit 1; fi
echo "wrote $out: $(wc -c < "$out") bytes"
