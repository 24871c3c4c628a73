/* tcmu-obd C helpers: non-mutating scatter/gather over a command's iovec array. */
#include <stddef.h>
#include <stdint.h>

struct tcmulib_cmd;

size_t obd_cmd_iov_len(const struct tcmulib_cmd *cmd);
size_t obd_copy_to_iovec(const struct tcmulib_cmd *cmd, const void *buf, size_t len);
size_t obd_copy_from_iovec(const struct tcmulib_cmd *cmd, void *buf, size_t len);
size_t obd_zero_iovec_from(const struct tcmulib_cmd *cmd, size_t offset);
void obd_set_sense(struct tcmulib_cmd *cmd, const uint8_t *sense, size_t len);
