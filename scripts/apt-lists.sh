#!/usr/bin/env bash
# The embedded dataset comes from Debian's tuxpaint-stamps-default package via `apt-get download`,
# which needs apt's package lists. Fresh containers often ship without them: fill them when we can.
set -u
command -v apt-get >/dev/null || exit 0          # the download step explains what to do instead
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "apt package lists are empty: running apt-get update (needed to download the Tux Paint stamps)"
    apt-get update -qq
  else
    echo "apt package lists are empty: run 'sudo apt-get update' first (needed to download the Tux Paint stamps)" >&2
  fi
fi
