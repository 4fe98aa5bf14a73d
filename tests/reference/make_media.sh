#!/usr/bin/env bash
# Cuts the short clip excerpts committed under tests/fixtures/media from the full clips
# (../shared/media on the development machines; any H.264 MP4 works). Needs ffmpeg.
#   tests/reference/make_media.sh [MEDIA_DIR]
set -euo pipefail
media=${1:-"$(dirname "$0")/../../../shared/media"}
out="$(dirname "$0")/../fixtures/media"
mkdir -p "$out"
# 3 s of the landscape clip at half size, 25 fps (75 frames); the README's main command.
ffmpeg -v error -y -i "$media/woman-960x720-25fps.mp4" -t 3 -vf scale=480:360 -an \
  -c:v libx264 -preset slow -crf 20 -pix_fmt yuv420p -movflags +faststart "$out/woman-480x360-3s.mp4"
# 2 s of the portrait clip (portrait; frames not a multiple of 8 wide).
ffmpeg -v error -y -i "$media/portrait-540x960-25fps.mp4" -t 2 -vf scale=270:480 -an \
  -c:v libx264 -preset slow -crf 20 -pix_fmt yuv420p -movflags +faststart "$out/portrait-270x480-2s.mp4"
ls -l "$out"
