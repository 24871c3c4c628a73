/*
 * Small C helpers for the hot path of tcmu-obd's TCMU frontend.
 *
 * Unlike libtcmu's tcmu_memcpy_into_iovec/tcmu_memcpy_from_iovec these never modify the
 * command's iovec array (libtcmu's advance iov_base/iov_len as they copy), so a command can
 * be copied into more than once (e.g. data then zero padding) and inspected afterwards.
 */
#include <string.h>

#include "libtcmu_decls.h"
#include "obd_tcmu_helpers.h"

size_t obd_cmd_iov_len(const struct tcmulib_cmd *cmd)
{
    size_t total = 0;
    for (size_t i = 0; i < cmd->iov_cnt; i++)
        total += cmd->iovec[i].iov_len;
    return total;
}

/* Copy up to len bytes of buf into the iovecs, in order. Returns bytes copied. */
size_t obd_copy_to_iovec(const struct tcmulib_cmd *cmd, const void *buf, size_t len)
{
    const uint8_t *src = buf;
    size_t done = 0;
    for (size_t i = 0; i < cmd->iov_cnt && done < len; i++) {
        size_t n = cmd->iovec[i].iov_len;
        if (n > len - done)
            n = len - done;
        memcpy(cmd->iovec[i].iov_base, src + done, n);
        done += n;
    }
    return done;
}

/* Copy up to len bytes out of the iovecs into buf. Returns bytes copied. */
size_t obd_copy_from_iovec(const struct tcmulib_cmd *cmd, void *buf, size_t len)
{
    uint8_t *dst = buf;
    size_t done = 0;
    for (size_t i = 0; i < cmd->iov_cnt && done < len; i++) {
        size_t n = cmd->iovec[i].iov_len;
        if (n > len - done)
            n = len - done;
        memcpy(dst + done, cmd->iovec[i].iov_base, n);
        done += n;
    }
    return done;
}

/* Zero the iovec bytes from byte offset `offset` to the end. Returns bytes zeroed. */
size_t obd_zero_iovec_from(const struct tcmulib_cmd *cmd, size_t offset)
{
    size_t pos = 0, zeroed = 0;
    for (size_t i = 0; i < cmd->iov_cnt; i++) {
        size_t n = cmd->iovec[i].iov_len;
        if (pos + n > offset) {
            size_t skip = offset > pos ? offset - pos : 0;
            memset((uint8_t *)cmd->iovec[i].iov_base + skip, 0, n - skip);
            zeroed += n - skip;
        }
        pos += n;
    }
    return zeroed;
}

/*
 * CDB length from the opcode's group code (SPC: 0 -> 6, 1/2 -> 10, 4 -> 16, 5 -> 12,
 * 0x7F variable length -> 8 + byte 7). libtcmu only hands out commands whose CDB it could
 * size; 6 for anything else keeps the caller within the copy libtcmu made.
 */
size_t obd_cmd_cdb_len(const struct tcmulib_cmd *cmd)
{
    uint8_t op = cmd->cdb[0];
    switch (op >> 5) {
    case 0:
        return 6;
    case 1:
    case 2:
        return 10;
    case 4:
        return 16;
    case 5:
        return 12;
    default:
        return op == 0x7f ? 8 + (size_t)cmd->cdb[7] : 6;
    }
}

/*
 * The data-in path of a GOOD completion in one call: copy len bytes of buf into the
 * iovecs, zero the rest of them (stale data area bytes must not reach the initiator),
 * complete the command with TCMU_STS_OK (which frees it). Returns bytes copied.
 */
size_t obd_complete_data_in(struct tcmu_device *dev, struct tcmulib_cmd *cmd, const void *buf, size_t len)
{
    size_t n = len ? obd_copy_to_iovec(cmd, buf, len) : 0;
    obd_zero_iovec_from(cmd, n);
    tcmulib_command_complete(dev, cmd, 0 /* TCMU_STS_OK */);
    return n;
}

void obd_set_sense(struct tcmulib_cmd *cmd, const uint8_t *sense, size_t len)
{
    if (len > sizeof(cmd->sense_buf))
        len = sizeof(cmd->sense_buf);
    memset(cmd->sense_buf, 0, sizeof(cmd->sense_buf));
    memcpy(cmd->sense_buf, sense, len);
}

static uint64_t be_get(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/*
 * Take up to max queued commands off the ring in one call (the ring drain then costs one
 * Python->C crossing per batch instead of two per command). cmds[i] receives each command;
 * info[4i..4i+3] says whether Python may answer it in place:
 *   [0] byte offset on the disk of a READ(10)/READ(16) that can be answered straight into its
 *       data buffer (non-empty, inside num_lbas, one iovec that holds the whole transfer and
 *       lies inside the data area), else OBD_NOT_IN_PLACE;
 *   [1] its length in bytes; [2] the offset of its buffer in the data area; [3] the opcode.
 * Only those two reads are decoded here, for LBA and length; scsi.py stays the authority on
 * CDBs, and anything else (or any read that does not qualify) goes through it.
 */
size_t obd_peek_commands(struct tcmu_device *dev, struct tcmulib_cmd **cmds, uint64_t *info, size_t max,
                         const uint8_t *area, size_t area_len, uint64_t num_lbas, unsigned block_shift)
{
    size_t n = 0;
    while (n < max) {
        struct tcmulib_cmd *cmd = tcmulib_get_next_command(dev, 0);
        if (!cmd)
            break;
        const uint8_t *cdb = cmd->cdb;
        uint64_t *out = info + 4 * n;
        uint64_t lba = 0, blocks = 0;
        cmds[n++] = cmd;
        out[0] = OBD_NOT_IN_PLACE;
        out[1] = out[2] = 0;
        out[3] = cdb[0];
        if (cdb[0] == 0x28) {
            lba = be_get(cdb + 2, 4);
            blocks = be_get(cdb + 7, 2);
        } else if (cdb[0] == 0x88) {
            lba = be_get(cdb + 2, 8);
            blocks = be_get(cdb + 10, 4);
        } else {
            continue;
        }
        if (!blocks || lba >= num_lbas || blocks > num_lbas - lba || cmd->iov_cnt != 1)
            continue;
        uint64_t length = blocks << block_shift;
        const uint8_t *buf = cmd->iovec[0].iov_base;
        if (cmd->iovec[0].iov_len < length || buf < area || length > area_len ||
            (size_t)(buf - area) > area_len - length)
            continue;
        out[0] = lba << block_shift;
        out[1] = length;
        out[2] = (uint64_t)(buf - area);
    }
    return n;
}

/* tcmulib_processing_start (acknowledge the uio event), then obd_peek_commands. */
size_t obd_start_and_peek(struct tcmu_device *dev, struct tcmulib_cmd **cmds, uint64_t *info, size_t max,
                          const uint8_t *area, size_t area_len, uint64_t num_lbas, unsigned block_shift)
{
    tcmulib_processing_start(dev);
    return obd_peek_commands(dev, cmds, info, max, area, area_len, num_lbas, block_shift);
}

/* GOOD for cmds[i], whose first `filled` data bytes were written in place: zero the rest of
 * its iovecs (stale data-area bytes must not reach the initiator) and complete it. */
void obd_complete_in_place(struct tcmu_device *dev, struct tcmulib_cmd **cmds, size_t i, size_t filled)
{
    obd_zero_iovec_from(cmds[i], filled);
    tcmulib_command_complete(dev, cmds[i], 0 /* TCMU_STS_OK */);
}
