#!/usr/bin/env bash
# Print the first of the candidate directories that sits on a real disk (not tmpfs) with
# at least $1 GB free: where a benchmark's files should go on an unknown machine.
need_gb=${1:-45}
for d in /tmp /var/tmp /root "$HOME" "$PWD"; do
    [ -d "$d" ] || continue
    fs=$(stat -f -c %T "$d")
    avail=$(df -P -BG "$d" | awk 'NR==2 {sub("G", "", $4); print $4}')
    echo "candidate $d: $fs, ${avail} GB free" >&2
    if [ "$fs" != "tmpfs" ] && [ "$avail" -ge "$need_gb" ]; then echo "$d"; exit 0; fi
done
echo "no directory with ${need_gb} GB free on a disk" >&2; exit 1
