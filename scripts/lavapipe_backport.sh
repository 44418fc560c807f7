#!/usr/bin/env bash
# Mesa's lavapipe (Vulkan on the CPU) from Debian's bookworm-backports, unpacked into a folder of
# its own beside the system's driver, not installed; prints the VK_ICD_FILENAMES that makes wgpu
# use it. Debian 12's own lavapipe (Mesa 22.3.6) loses values in long reductions, and the
# backport (Mesa 25.0.7) does not (README.md, Known issues):
#
#   eval "$(bash scripts/lavapipe_backport.sh)"
#   CUBECL_WGPU_DEFAULT_DEVICE=Cpu cargo test --release --test it -- --ignored \
#       long_reductions_keep_every_value
#
# Debian 12 (or a system with its libraries: the driver links libLLVM-15, which Debian 12's
# mesa-vulkan-drivers brings) and the network to deb.debian.org. The folder, by default in
# resnet-burn's cache, is kept and reused; pass another as the first argument.
set -euo pipefail
dir=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/resnet-burn/lavapipe-backport}
lib=$dir/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so
if [ ! -f "$lib" ]; then
    mkdir -p "$dir/lists/partial"
    echo "deb http://deb.debian.org/debian bookworm-backports main" > "$dir/sources.list"
    o=(-oDir::Etc::sourcelist="$dir/sources.list" -oDir::Etc::sourceparts=-
        -oDir::State::Lists="$dir/lists" -oAPT::Sandbox::User=root)
    apt-get "${o[@]}" update -qq >&2
    (cd "$dir" && apt-get "${o[@]}" download mesa-vulkan-drivers/bookworm-backports >&2)
    dpkg-deb -x "$dir"/mesa-vulkan-drivers_*.deb "$dir/root"
fi
sed "s#\"library_path\": \"[^\"]*\"#\"library_path\": \"$lib\"#" \
    "$dir/root/usr/share/vulkan/icd.d/lvp_icd.json" > "$dir/lvp_icd.json"
echo "export VK_ICD_FILENAMES=$dir/lvp_icd.json  # $(grep -aom1 'Mesa [0-9][^ ]*' "$lib")"
