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
