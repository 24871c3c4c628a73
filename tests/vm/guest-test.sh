#!/bin/bash
# The rig's test run, executed INSIDE the VM (by tests/vm/init, cwd = the scratch dir).
#
# Reads (prepared on the host by tests/vm/rig.py):
#   scratch/expected.env        shell variables: expected sha256s, sizes, fixture config paths
#   scratch/expected-L12.*      sha256sum -c list, absent paths and symlinks of the L12 ext4
#   scratch/backing.raw         64 MiB random raw (tcmu-runner baseline); sha in expected.env
#   scratch/L12.raw             (optional, cached) raw export of the L12 image, for the
#                               tcmu-runner side of the benchmark; made here if missing
#   scratch/rw/                 fresh writable upper (tcmu-obd create), or rw/SKIP with a reason
# Writes:
#   scratch/results.jsonl       one JSON object per check: {"name","status","detail","data"}
#   scratch/results.json        the same, as {"checks": {name: {...}}, "bench": {...}}
#   scratch/logs/               daemon / tcmu-runner / iscsid logs, dmesg
# Every check records pass/fail/skip and the script goes on, so one failure does not hide the
# rest. Exit status 0 = the script ran to the end (the host asserts on the results).
set -u
SCRATCH=$PWD
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
S=$REPO/configfs-scripts
OBD=$REPO/.venv/bin/tcmu-obd
C=/sys/kernel/config/target
LOGS=$SCRATCH/logs
RES=$SCRATCH/results.jsonl
mkdir -p "$LOGS" /tmp/obd
: > "$RES"
T0=$EPOCHREALTIME
# shellcheck disable=SC1091
. "$SCRATCH/expected.env"
# precompiled tcmu_obd bytecode (made by rig.py; the host tree has none) onto the tmpfs overlay
[ -f "$SCRATCH/pycache.tar" ] && tar -xf "$SCRATCH/pycache.tar" -C / 2>/dev/null
export OBD_CMD_TIME_OUT=${OBD_CMD_TIME_OUT:-60}   # a hung handler fails a test, not the run
export OBD_MAX_DATA_AREA_MB=${OBD_MAX_DATA_AREA_MB:-64}

# ---------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
elapsed() { bc <<<"scale=3; ($EPOCHREALTIME - $1)/1"; }
log() { echo "[guest +$(elapsed "$T0")s] $*"; }

json_str() {
    local s=$1
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\t'/\\t}; s=${s//$'\r'/}
    s=${s//[$'\x01'-$'\x1f']/?}
    printf '"%s"' "$s"
}

# rec NAME pass|fail|skip DETAIL [DATA_JSON_OBJECT]
rec() {
    local name=$1 status=$2 detail=$3 data=${4:-'{}'}
    printf '{"name":%s,"status":%s,"detail":%s,"data":%s,"t":%s}\n' \
        "$(json_str "$name")" "$(json_str "$status")" "$(json_str "$detail")" "$data" \
        "$(elapsed "$T0")" >> "$RES"
    log "CHECK $name: $status - $detail"
}

# check_eq NAME GOT WANT DETAIL
check_eq() {
    if [ "$2" = "$3" ]; then rec "$1" pass "$4: $2"; else rec "$1" fail "$4: got $2, want $3"; fi
}

sha_dev() { dd if="$1" bs=1M iflag=direct status=none ${2:+count=$2} | sha256sum | cut -d' ' -f1; }

# wait_genl_listener PID TIMEOUT: the handler is ready once it has a generic-netlink socket
# (protocol 16) subscribed to a multicast group (TCM-USER "config"): poll /proc/net/netlink with
# builtins only (forks cost ~80 ms under TCG). A poll with a timeout, because no event exists
# for "a process joined a netlink group".
wait_genl_listener() {
    wait_netlink_listener 16 "$@"
}
# wait_netlink_listener PROTO PID TIMEOUT (15 = NETLINK_KOBJECT_UEVENT, 16 = generic netlink)
wait_netlink_listener() {
    local proto=$1 pid=$2 ticks=$(( $3 * 20 )) sk eth port groups rest
    while [ "$ticks" -gt 0 ]; do
        kill -0 "$pid" 2>/dev/null || return 2
        while read -r sk eth port groups rest; do
            [ "$eth" = "$proto" ] || continue
            [ "$groups" = 00000000 ] && continue
            # libnl/netlink port ids are pid + (n << 22), or negative when auto-assigned
            if [ "$port" -lt 0 ] || [ $(( port % 4194304 )) = "$pid" ]; then return 0; fi
        done < /proc/net/netlink
        read -r -t 0.05 < /dev/zero  # 50 ms without forking
        ticks=$((ticks - 1))
    done
    return 1
}

stop_pid() {  # stop_pid PID TIMEOUT_S: SIGTERM, wait, SIGKILL
    local pid=$1 ticks=$(( ${2:-10} * 20 ))
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && [ "$ticks" -gt 0 ]; do
        read -r -t 0.05 < /dev/zero; ticks=$((ticks - 1))
    done
    kill -0 "$pid" 2>/dev/null && { log "pid $pid ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; }
    wait "$pid" 2>/dev/null
}

remove_all_luns() {
    local n
    for n in $(OBD_QUIET=1 "$S/obd-lun-list" -a | cut -f1); do
        "$S/obd-lun-remove" "$n" || log "remove $n failed"
    done
}

# bench_seq LABEL DEV BYTES -> sets BENCH_MIBS
bench_seq() {
    local t mb
    t=$(now)
    dd if="$2" of=/dev/null bs=1M iflag=direct status=none
    BENCH_SECS=$(elapsed "$t")
    mb=$(( $3 / 1048576 ))
    BENCH_MIBS=$(bc <<<"scale=2; $mb / $BENCH_SECS")
    log "bench $1 seq: ${mb} MiB in ${BENCH_SECS}s = ${BENCH_MIBS} MiB/s"
}

# cpu_ticks PID -> utime+stime of the whole process (all threads), in clock ticks
cpu_ticks() {
    local st
    read -r -a st < "/proc/$1/stat" 2>/dev/null || { echo 0; return; }
    echo $(( st[13] + st[14] ))
}

# bench_rand LABEL DEV QD SECONDS [HANDLER_PID] -> sets BENCH_IOPS (4 KiB random reads,
# O_DIRECT) and, with a pid, BENCH_CPU_US: the handler's CPU time per read in microseconds.
# IOPS swing with the host's load; CPU per read is the handler's own cost and moves less.
bench_rand() {
    local out engine=psync c0 c1 ios
    [ "$3" -gt 1 ] && engine=libaio
    BENCH_IOPS=0; BENCH_CPU_US=
    if command -v fio >/dev/null; then
        [ -n "${5:-}" ] && c0=$(cpu_ticks "$5")
        out=$(fio --name=rr --filename="$2" --direct=1 --rw=randread --bs=4k --ioengine=$engine \
                  --iodepth="$3" --runtime="$4" --time_based --norandommap --randrepeat=0 \
                  --minimal 2>>"$LOGS/fio.err") || { log "fio failed"; return 1; }
        [ -n "${5:-}" ] && c1=$(cpu_ticks "$5")
        # terse v3: field 6 = KiB read, field 8 = read IOPS
        BENCH_IOPS=$(cut -d';' -f8 <<<"$out")
        ios=$(( $(cut -d';' -f6 <<<"$out") / 4 ))
        if [ -n "${5:-}" ] && [ "$ios" -gt 0 ]; then
            BENCH_CPU_US=$(( (c1 - c0) * 1000000 / $(getconf CLK_TCK) / ios ))
        fi
    else
        return 1
    fi
    log "bench $1 rand4k qd$3: $BENCH_IOPS IOPS${BENCH_CPU_US:+, handler CPU ${BENCH_CPU_US} us/read}"
}

declare -A BENCH=()

# ---------------------------------------------------------------- phase A: tcmu-runner baseline
log "kernel $(uname -r), $(nproc) cpus; configfs: $(ls $C)"
RUNNER_PID=
start_runner() {
    mkdir -p /tmp/tcmu-handlers /tmp/tcmu-log
    ln -sf /usr/lib/x86_64-linux-gnu/tcmu-runner/handler_qcow.so /tmp/tcmu-handlers/
    tcmu-runner --handler-path /tmp/tcmu-handlers -l /tmp/tcmu-log >> "$LOGS/tcmu-runner.out" 2>&1 &
    RUNNER_PID=$!
    wait_genl_listener "$RUNNER_PID" 30
}
stop_runner() {
    [ -n "$RUNNER_PID" ] && stop_pid "$RUNNER_PID" 10
    cat /tmp/tcmu-log/tcmu-runner.log >> "$LOGS/tcmu-runner.log" 2>/dev/null
    rm -f /tmp/tcmu-log/tcmu-runner.log
    RUNNER_PID=
}

# runner_bench [again]: L12.raw through tcmu-runner's qcow handler (raw mode). "again" (after our
# daemon's turn) repeats only the random reads, as runner2_*: our numbers are then bracketed by
# two of the baseline's, and the host's load drifting between the phases weighs less in the ratio.
runner_bench() {
    local wwn dev k=runner check=bench_runner
    [ "${1:-}" = again ] && { k=runner2; check=bench_runner_again; }
    wwn=$(OBD_SUBTYPE=qcow OBD_LUN_ID=90 "$S/obd-lun-create" "$SCRATCH/L12.raw" "$L12_SIZE" rb_l12) \
        || { rec $check fail "LUN for L12.raw failed"; return; }
    dev=$("$S/obd-lun-disk" "$wwn" 60) || { rec $check fail "no disk for L12.raw"; return; }
    if [ $k = runner2 ]; then
        bench_rand runner "$dev" 1 "$BENCH_RAND_SECS" "$RUNNER_PID" && BENCH[runner2_rand4k_qd1_iops]=$BENCH_IOPS \
            && BENCH[runner2_rand4k_qd1_cpu_us]=$BENCH_CPU_US
        bench_rand runner "$dev" 16 "$BENCH_RAND_SECS" "$RUNNER_PID" && BENCH[runner2_rand4k_qd16_iops]=$BENCH_IOPS \
            && BENCH[runner2_rand4k_qd16_cpu_us]=$BENCH_CPU_US
        rec $check pass "tcmu-runner again: ${BENCH[runner2_rand4k_qd1_iops]:-?} IOPS qd1, ${BENCH[runner2_rand4k_qd16_iops]:-?} IOPS qd16"
        "$S/obd-lun-remove" rb_l12
        return
    fi
    bench_seq runner "$dev" "$L12_SIZE"; BENCH[runner_seq_mibs]=$BENCH_MIBS; BENCH[runner_seq_secs]=$BENCH_SECS
    bench_rand runner "$dev" 1 "$BENCH_RAND_SECS" "$RUNNER_PID" && BENCH[runner_rand4k_qd1_iops]=$BENCH_IOPS \
        && BENCH[runner_rand4k_qd1_cpu_us]=$BENCH_CPU_US
    bench_rand runner "$dev" 16 "$BENCH_RAND_SECS" "$RUNNER_PID" && BENCH[runner_rand4k_qd16_iops]=$BENCH_IOPS \
        && BENCH[runner_rand4k_qd16_cpu_us]=$BENCH_CPU_US
    rec bench_runner pass "tcmu-runner qcow(raw) L12: ${BENCH[runner_seq_mibs]} MiB/s seq, ${BENCH[runner_rand4k_qd1_iops]:-?} IOPS qd1, ${BENCH[runner_rand4k_qd16_iops]:-?} IOPS qd16"
    "$S/obd-lun-remove" rb_l12
}

log "phase A: tcmu-runner"
if start_runner; then
    rec runner_start pass "tcmu-runner ready (pid $RUNNER_PID)"
    if WWN=$(OBD_SUBTYPE=qcow OBD_LUN_ID=80 "$S/obd-lun-create" "$SCRATCH/backing.raw" "$BACKING_SIZE" rb_base) \
        && DEV=$("$S/obd-lun-disk" "$WWN" 60); then
        check_eq runner_baseline_sha256 "$(sha_dev "$DEV")" "$BACKING_SHA256" "tcmu-runner qcow handler, raw file -> $DEV sha256"
        list=$("$S/obd-lun-list" -a)
        case "$list" in *rb_base*"$WWN"*) rec configfs_list pass "obd-lun-list shows the LUN";;
                        *) rec configfs_list fail "obd-lun-list: $list";; esac
        "$S/obd-lun-remove" rb_base && [ ! -e "$C/loopback/$WWN" ] && [ ! -e "$C/core/user_999999999/rb_base" ] \
            && rec configfs_remove pass "obd-lun-remove cleaned configfs" \
            || rec configfs_remove fail "configfs leftovers: $(ls $C/loopback $C/core 2>&1)"
    else
        rec runner_baseline_sha256 fail "LUN creation for backing.raw failed"
    fi
    RUNNER_BENCH_DONE=
    if [ -s "$SCRATCH/L12.raw" ]; then runner_bench; RUNNER_BENCH_DONE=1; fi
    stop_runner
else
    rec runner_start fail "tcmu-runner did not become ready; see logs/tcmu-runner.*"
    stop_runner
fi
remove_all_luns

# ---------------------------------------------------------------- phase B: our daemon
DAEMON_PID=
start_daemon() {
    # shellcheck disable=SC2086
    local ready=/tmp/obd/tcmu-obd.ready t rc=1 ticks
    rm -f "$ready"
    t=$(now)
    "$OBD" ${OBD_VERBOSE:--v} run --ready-file "$ready" ${OBD_RUN_ARGS:-} >> "$LOGS/tcmu-obd.log" 2>&1 &
    DAEMON_PID=$!
    # readiness = the --ready-file appears (the daemon writes it once serving). A poll with a
    # timeout using builtins only: there is no event to block on from bash.
    ticks=$(( ${DAEMON_START_TIMEOUT:-90} * 20 ))
    while [ "$ticks" -gt 0 ]; do
        [ -s "$ready" ] && { rc=0; break; }
        kill -0 "$DAEMON_PID" 2>/dev/null || { rc=2; break; }
        read -r -t 0.05 < /dev/zero
        ticks=$((ticks - 1))
    done
    log "tcmu-obd run pid $DAEMON_PID: ready rc=$rc after $(elapsed "$t")s"
    return $rc
}
stop_daemon() { [ -n "$DAEMON_PID" ] && stop_pid "$DAEMON_PID" 20; DAEMON_PID=; }

log "phase B: tcmu-obd run"
if ! start_daemon; then
    rec daemon_start fail "tcmu-obd run did not become ready: $(tail -n 3 "$LOGS/tcmu-obd.log")"
    stop_daemon
else
    rec daemon_start pass "tcmu-obd run ready (pid $DAEMON_PID)"

    # pyudev lookup started BEFORE the LUN exists: exercises the monitor path (--wait)
    P12_WWN=naa.$(printf '199%013d' 2)
    "$OBD" device "$P12_WWN" --wait --timeout 90 --json > "$LOGS/device-wait.out" 2> "$LOGS/device-wait.err" &
    DEVWAIT_PID=$!
    # create the LUNs only once its uevent monitor listens (a NETLINK_KOBJECT_UEVENT socket
    # with a group), so the check really exercises the monitor and not the initial scan
    if wait_netlink_listener 15 "$DEVWAIT_PID" 60; then MON=listening; else MON="not seen listening"; fi

    # two LUNs at the same time; the no-wait lookup of L12 runs in the background later
    L12_WWN=$(OBD_LUN_ID=1 "$S/obd-lun-create" "$L12_CONFIG" "$L12_SIZE" obd_l12) || L12_WWN=
    P12_OK=; OBD_LUN_ID=2 "$S/obd-lun-create" "$P12_CONFIG" "$P12_SIZE" obd_p12 >/dev/null && P12_OK=1
    L12_DEV=; P12_DEV=
    [ -n "$L12_WWN" ] && L12_DEV=$("$S/obd-lun-disk" "$L12_WWN" 90)
    [ -n "$P12_OK" ] && P12_DEV=$("$S/obd-lun-disk" "$P12_WWN" 90)
    if [ -n "$L12_DEV" ] && [ -n "$P12_DEV" ]; then
        rec lun_create pass "L12 -> $L12_DEV ($L12_WWN), p12 -> $P12_DEV ($P12_WWN)"
    else
        rec lun_create fail "L12 dev='$L12_DEV' p12 dev='$P12_DEV'; see logs/tcmu-obd.log and dmesg"
    fi

    # device lookups (pyudev / sysfs fallback); each python start costs seconds under TCG, so
    # the plain lookup runs in the background while p12 is being read
    DEVL12_PID=
    if [ -n "$L12_DEV" ]; then
        "$OBD" device "${L12_WWN#naa.}" > "$LOGS/device.out" 2> "$LOGS/device.err" &
        DEVL12_PID=$!
    fi
    if [ -n "$P12_DEV" ]; then
        check_eq obd_p12_sha256 "$(sha_dev "$P12_DEV")" "$P12_SHA256" "p12.lz4.zfile via TCMU sha256"
    else rec obd_p12_sha256 fail "no disk"; fi
    if wait "$DEVWAIT_PID"; then
        got=$(cat "$LOGS/device-wait.out")
        case "$got" in *"\"$P12_DEV\""*) rec device_lookup_wait pass "tcmu-obd device --wait (monitor $MON before the LUN existed): $(tr -d ' \n' <<<"$got")" ;;
                       *) rec device_lookup_wait fail "tcmu-obd device --wait printed '$got', want $P12_DEV" ;; esac
    else
        rec device_lookup_wait fail "tcmu-obd device --wait failed: $(tail -n3 "$LOGS/device-wait.err")"
    fi
    if [ -n "$DEVL12_PID" ]; then
        wait "$DEVL12_PID"
        check_eq device_lookup "$(cat "$LOGS/device.out")" "$L12_DEV" "tcmu-obd device ${L12_WWN#naa.} (no --wait)"
    else
        rec device_lookup fail "no L12 disk to look up"
    fi

    if [ -n "$L12_DEV" ]; then
        t=$(now)
        if [ -s "$SCRATCH/L12.raw" ] && [ -n "${L12_RAW_MD5:-}" ]; then
            # L12.raw's sha256 was verified against expected.json on the host, which also took
            # its md5: md5sum is ~2.7x cheaper than sha256sum under TCG (1 GiB here)
            got=$(dd if="$L12_DEV" bs=1M iflag=direct status=none | md5sum | cut -d' ' -f1)
            [ "$got" = "$L12_RAW_MD5" ] && got=$L12_SHA256 || got="md5:$got (want md5 $L12_RAW_MD5 of the verified raw)"
        elif [ -s "$SCRATCH/L12.raw" ]; then
            got=$(sha_dev "$L12_DEV")
        else  # keep a sparse raw copy for the tcmu-runner side of the benchmark
            dd if="$L12_DEV" bs=1M iflag=direct status=none | tee >(sha256sum > /tmp/obd/l12.sha) \
                | dd of="$SCRATCH/L12.raw.tmp" bs=1M iflag=fullblock conv=sparse status=none
            wait $!  # the sha256sum process substitution
            got=$(cut -d' ' -f1 /tmp/obd/l12.sha)
            if [ "$got" = "$L12_SHA256" ]; then mv "$SCRATCH/L12.raw.tmp" "$SCRATCH/L12.raw"; truncate -s "$L12_SIZE" "$SCRATCH/L12.raw"; fi
        fi
        check_eq obd_l12_sha256 "$got" "$L12_SHA256" "L12.zstd.zfile (1 GiB, 2 layers) via TCMU sha256 ($(elapsed "$t")s)"

        # ext4 read-only mount + file checks
        mkdir -p /mnt/l12
        if mount -t ext4 -o ro,noload "$L12_DEV" /mnt/l12 2>"$LOGS/mount.err"; then
            out=$(cd /mnt/l12 && sha256sum -c "$SCRATCH/expected-L12.sha256" 2>&1); rc=$?
            bad=""
            while read -r p; do [ -z "$p" ] || [ ! -e "/mnt/l12$p" ] || bad="$bad absent-but-present:$p"; done < "$SCRATCH/expected-L12.absent"
            while read -r p tgt; do [ "$(readlink "/mnt/l12$p")" = "$tgt" ] || bad="$bad symlink:$p"; done < "$SCRATCH/expected-L12.symlinks"
            if [ $rc = 0 ] && [ -z "$bad" ]; then
                rec ext4_files pass "mounted ro; $(wc -l < "$SCRATCH/expected-L12.sha256") files match, absent/symlinks ok"
            else
                rec ext4_files fail "sha256sum -c rc=$rc: $(grep -v ': OK$' <<<"$out" | head -5) $bad"
            fi
            umount /mnt/l12
        else
            rec ext4_files fail "mount failed: $(cat "$LOGS/mount.err")"
        fi

        # benchmark: our daemon, same image
        bench_seq obd "$L12_DEV" "$L12_SIZE"; BENCH[obd_seq_mibs]=$BENCH_MIBS; BENCH[obd_seq_secs]=$BENCH_SECS
        bench_rand obd "$L12_DEV" 1 "$BENCH_RAND_SECS" "$DAEMON_PID" && BENCH[obd_rand4k_qd1_iops]=$BENCH_IOPS \
            && BENCH[obd_rand4k_qd1_cpu_us]=$BENCH_CPU_US
        bench_rand obd "$L12_DEV" 16 "$BENCH_RAND_SECS" "$DAEMON_PID" && BENCH[obd_rand4k_qd16_iops]=$BENCH_IOPS \
            && BENCH[obd_rand4k_qd16_cpu_us]=$BENCH_CPU_US
        rec bench_obd pass "tcmu-obd L12: ${BENCH[obd_seq_mibs]} MiB/s seq, ${BENCH[obd_rand4k_qd1_iops]:-?} IOPS qd1, ${BENCH[obd_rand4k_qd16_iops]:-?} IOPS qd16"
    else
        rec obd_l12_sha256 fail "no disk"; rec ext4_files fail "no disk"; rec bench_obd fail "no disk"
    fi

    # ------------------------------------------------------------ restart with LUNs in place
    # Both LUNs stay linked while the daemon goes away, first with SIGTERM (clean shutdown),
    # then with SIGKILL (no shutdown at all). The new daemon must re-open the existing
    # devices itself (libtcmu reports them to `added` at tcmulib_initialize) and serve the
    # same /dev/sdX bit-exactly, without the LUNs being re-created.
    reattach_check() {  # reattach_check NAME SIGNAL
        local name=$1 sig=$2 pid=$DAEMON_PID line n got
        if [ "$sig" = TERM ]; then stop_daemon; else kill -KILL "$pid"; wait "$pid" 2>/dev/null; DAEMON_PID=; fi
        if ! compgen -G "$C/core/user_*/obd_p12" > /dev/null; then
            rec "$name" fail "the p12 storage object vanished with the daemon"; return 1
        fi
        if ! start_daemon; then
            rec "$name" fail "daemon did not restart: $(tail -n 3 "$LOGS/tcmu-obd.log")"; return 1
        fi
        line=$(grep 'tcmu-obd run: ready' "$LOGS/tcmu-obd.log" | tail -n 1)
        n=${line##*ready (}; n=${n%% device*}
        got=$(sha_dev "$P12_DEV")
        if [ "$n" = 2 ] && [ "$got" = "$P12_SHA256" ]; then
            rec "$name" pass "after SIG$sig the new daemon re-attached $n existing devices; $P12_DEV (p12, not re-created) sha256 ok"
        else
            rec "$name" fail "after SIG$sig: ready line '$line' (want 2 devices), p12 sha256 $got want $P12_SHA256"
        fi
    }
    if [ -n "$P12_DEV" ] && [ -n "$L12_DEV" ]; then
        reattach_check daemon_reattach TERM && reattach_check daemon_reattach_kill KILL
    else
        rec daemon_reattach fail "no LUNs to keep across the restart"
    fi

    # ------------------------------------------------------------ iSCSI export of p12
    if [ -n "$P12_DEV" ]; then
        mkdir -p /run/lock/iscsi /var/lib/iscsi/nodes /var/lib/iscsi/send_targets /etc/iscsi
        # own session: iscsid's SIGTERM handler signals its whole process group
        setsid iscsid -f -n >> "$LOGS/iscsid.log" 2>&1 &
        ISCSID_PID=$!
        if IQN=$("$S/obd-iscsi-export" obd_p12 127.0.0.1:3260); then
            ok=
            for _ in 1 2 3 4 5 6 7 8 9 10; do  # iscsid's control socket appears asynchronously
                if iscsiadm -m discovery -t sendtargets -p 127.0.0.1:3260 > "$LOGS/iscsi-discovery.out" 2>&1; then ok=1; break; fi
                read -r -t 0.3 < /dev/zero
            done
            if [ -n "$ok" ] && grep -q "$IQN" "$LOGS/iscsi-discovery.out" && \
               iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --login >> "$LOGS/iscsi-login.out" 2>&1; then
                ISDEV=
                for _ in $(seq 1 200); do
                    for b in /sys/class/iscsi_session/session*/device/target*/*:*:*:0/block/*; do
                        [ -e "$b" ] && [ -b "/dev/${b##*/}" ] && ISDEV=/dev/${b##*/}
                    done
                    [ -n "$ISDEV" ] && break
                    read -r -t 0.05 < /dev/zero
                done
                if [ -n "$ISDEV" ]; then
                    # same storage object, same VPD serial: the lookup must report both disks
                    "$OBD" device "$P12_WWN" --json > "$LOGS/device-iscsi.out" 2> "$LOGS/device-iscsi.err" &
                    DEVISCSI_PID=$!
                    check_eq iscsi_sha256 "$(sha_dev "$ISDEV")" "$P12_SHA256" "iSCSI $IQN via 127.0.0.1:3260 -> $ISDEV sha256"
                    if wait "$DEVISCSI_PID"; then
                        got=$(tr -d ' \n' < "$LOGS/device-iscsi.out")
                        case "$got" in
                            *"\"node\":\"$P12_DEV\""*"\"transport\":\"loopback\""*"\"node\":\"$ISDEV\""*"\"transport\":\"iscsi\""*)
                                rec device_lookup_iscsi pass "tcmu-obd device finds both disks: loopback $P12_DEV, iscsi $ISDEV" ;;
                            *) rec device_lookup_iscsi fail "want loopback $P12_DEV + iscsi $ISDEV, got: $got" ;;
                        esac
                    else
                        rec device_lookup_iscsi fail "tcmu-obd device failed: $(tail -n3 "$LOGS/device-iscsi.err")"
                    fi
                else
                    rec iscsi_sha256 fail "logged in but no iSCSI disk appeared"
                fi
                iscsiadm -m node -T "$IQN" -p 127.0.0.1:3260 --logout >> "$LOGS/iscsi-login.out" 2>&1
            else
                rec iscsi_sha256 fail "discovery/login failed: $(tail -n3 "$LOGS/iscsi-discovery.out" "$LOGS/iscsi-login.out" 2>/dev/null)"
            fi
            "$S/obd-iscsi-unexport" obd_p12 && [ ! -e "$C/iscsi/$IQN" ] \
                && rec iscsi_unexport pass "obd-iscsi-unexport removed $IQN" \
                || rec iscsi_unexport fail "iSCSI target still there"
        else
            rec iscsi_sha256 fail "obd-iscsi-export failed"
        fi
        stop_pid "$ISCSID_PID" 5
    else
        rec iscsi_sha256 fail "no p12 LUN to export"
    fi

    remove_all_luns

    # ------------------------------------------------------------ writable upper layer
    if [ -f "$SCRATCH/rw/SKIP" ]; then
        rec rw_persist skip "$(cat "$SCRATCH/rw/SKIP")"
    else
        cat > "$SCRATCH/rw/config.v1.json" <<EOF
{"lowers": [{"file": "$P1_LAYER"}],
 "upper": {"index": "$SCRATCH/rw/upper.index", "data": "$SCRATCH/rw/upper.data"},
 "resultFile": "$SCRATCH/rw/result.txt"}
EOF
        RW_SIZE=$RW_VSIZE
        rw_fail() { rec rw_persist fail "$1"; }
        if RW_WWN=$(OBD_LUN_ID=3 "$S/obd-lun-create" "$SCRATCH/rw/config.v1.json" "$RW_SIZE" obd_rw) \
           && RW_DEV=$("$S/obd-lun-disk" "$RW_WWN" 90); then
            before=$(sha_dev "$RW_DEV" 8)
            if [ "$before" != "$P1_SHA256" ]; then
                rw_fail "first 8 MiB before writes: $before, want p1 $P1_SHA256"
            else
                # 1 MiB at 4 MiB (over lower data) and 1 MiB at 100 MiB (beyond the lowers)
                dd if="$SCRATCH/rw/chunk.bin" of="$RW_DEV" bs=1M seek=4 oflag=direct conv=notrunc status=none && \
                dd if="$SCRATCH/rw/chunk.bin" of="$RW_DEV" bs=1M seek=100 oflag=direct conv=notrunc status=none && sync
                w1=$(dd if="$RW_DEV" bs=1M skip=4 count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
                w2=$(dd if="$RW_DEV" bs=1M skip=100 count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
                after=$(sha_dev "$RW_DEV" 8)
                "$S/obd-lun-remove" obd_rw
                stop_daemon
                log "daemon stopped; upper data $(stat -c %s "$SCRATCH/rw/upper.data") B, index $(stat -c %s "$SCRATCH/rw/upper.index") B"
                # udev path of the device lookup: start udevd (the rig has none otherwise) and a
                # --wait lookup before the LUN is re-created; it must report by-id links
                UDEVD=; UDEVWAIT_PID=
                if [ -x /lib/systemd/systemd-udevd ] && \
                   /lib/systemd/systemd-udevd --daemon --resolve-names=never 2>>"$LOGS/udevd.log" && \
                   udevadm control --ping --timeout=30 2>>"$LOGS/udevd.log"; then
                    UDEVD=1
                    "$OBD" device naa.$(printf '199%013d' 3) --wait --timeout 120 --json \
                        > "$LOGS/device-udev.out" 2> "$LOGS/device-udev.err" &
                    UDEVWAIT_PID=$!
                fi
                if ! start_daemon; then
                    rw_fail "daemon did not restart"
                elif RW_WWN=$(OBD_LUN_ID=3 "$S/obd-lun-create" "$SCRATCH/rw/config.v1.json" "$RW_SIZE" obd_rw) \
                     && RW_DEV=$("$S/obd-lun-disk" "$RW_WWN" 90); then
                    r1=$(dd if="$RW_DEV" bs=1M skip=4 count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
                    r2=$(dd if="$RW_DEV" bs=1M skip=100 count=1 iflag=direct status=none | sha256sum | cut -d' ' -f1)
                    again=$(sha_dev "$RW_DEV" 8)
                    if [ -z "$UDEVD" ]; then
                        rec device_lookup_udev fail "systemd-udevd did not start: $(tail -n3 "$LOGS/udevd.log")"
                    elif wait "$UDEVWAIT_PID"; then
                        got=$(cat "$LOGS/device-udev.out")
                        case "$got" in
                            *"\"$RW_DEV\""*"/dev/disk/by-id/"*) rec device_lookup_udev pass "with udevd: $(tr -d ' \n' <<<"$got")" ;;
                            *) rec device_lookup_udev fail "with udevd: want $RW_DEV with by-id links, got: $got" ;;
                        esac
                    else
                        rec device_lookup_udev fail "tcmu-obd device --wait with udevd failed: $(tail -n3 "$LOGS/device-udev.err")"
                    fi
                    if [ "$w1" = "$CHUNK_SHA256" ] && [ "$w2" = "$CHUNK_SHA256" ] && [ "$r1" = "$CHUNK_SHA256" ] \
                       && [ "$r2" = "$CHUNK_SHA256" ] && [ "$again" = "$after" ] && [ "$after" != "$before" ]; then
                        rec rw_persist pass "2 MiB written (dd oflag=direct), read back before and after daemon restart"
                    else
                        rw_fail "chunk=$CHUNK_SHA256 w1=$w1 w2=$w2 r1=$r1 r2=$r2 after=$after again=$again before=$before"
                    fi
                    "$S/obd-lun-remove" obd_rw
                else
                    rw_fail "LUN re-creation after restart failed"
                fi
            fi
        else
            rw_fail "LUN creation failed (result: $(cat "$SCRATCH/rw/result.txt" 2>/dev/null))"
        fi
    fi
    remove_all_luns
    stop_daemon
    [ -n "${UDEVD:-}" ] && udevadm control --exit 2>/dev/null
fi
remove_all_luns

# ---------------------------------------------------------------- phase C: runner bench (deferred or again)
if [ -z "${RUNNER_BENCH_DONE:-}" ]; then
    if [ -s "$SCRATCH/L12.raw" ] && start_runner; then
        runner_bench
    else
        rec bench_runner fail "no L12.raw to serve (tcmu-obd export on the host and the guest copy both failed) or tcmu-runner did not start"
    fi
    stop_runner
    remove_all_luns
elif [ -n "${BENCH[obd_rand4k_qd1_iops]:-}" ] && start_runner; then
    runner_bench again
    stop_runner
    remove_all_luns
fi

# ---------------------------------------------------------------- results
ratio() { [ -n "${BENCH[$1]:-}" ] && [ -n "${BENCH[$2]:-}" ] && bc <<<"scale=3; ${BENCH[$1]} / ${BENCH[$2]}"; }
BENCH[ratio_seq]=$(ratio obd_seq_mibs runner_seq_mibs)
# random reads: against the mean of the baseline's runs before and after ours, when both exist
for q in qd1 qd16; do
    if [ -n "${BENCH[runner2_rand4k_${q}_iops]:-}" ] && [ -n "${BENCH[runner_rand4k_${q}_iops]:-}" ]; then
        BENCH[runnermean_rand4k_${q}_iops]=$(bc <<<"scale=1; (${BENCH[runner_rand4k_${q}_iops]} + ${BENCH[runner2_rand4k_${q}_iops]}) / 2")
        BENCH[ratio_rand4k_${q}]=$(ratio obd_rand4k_${q}_iops runnermean_rand4k_${q}_iops)
    else
        BENCH[ratio_rand4k_${q}]=$(ratio obd_rand4k_${q}_iops runner_rand4k_${q}_iops)
    fi
done
{
    printf '{'
    sep=
    for k in "${!BENCH[@]}"; do
        v=${BENCH[$k]}
        [ -n "$v" ] || continue
        [[ $v == .* ]] && v=0$v
        printf '%s"%s":%s' "$sep" "$k" "$v"; sep=,
    done
    printf '}\n'
} > "$SCRATCH/bench.json"
log "bench: $(cat "$SCRATCH/bench.json")"
dmesg > "$LOGS/dmesg.txt" 2>&1
python3 -S - "$RES" "$SCRATCH/bench.json" "$SCRATCH/results.json" "$(elapsed "$T0")" <<'EOF'
import json, sys
checks = {}
for line in open(sys.argv[1]):
    if line.strip():
        r = json.loads(line)
        checks[r.pop("name")] = r
json.dump({"checks": checks, "bench": json.load(open(sys.argv[2])), "guest_seconds": float(sys.argv[4])},
          open(sys.argv[3], "w"), indent=1, sort_keys=True)
EOF
log "done"
exit 0
