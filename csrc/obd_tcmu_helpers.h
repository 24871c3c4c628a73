/* tcmu-obd C helpers: non-mutating scatter/gather over a command's iovec array, CDB length, one-call GOOD completion. */
#include <stddef.h>
#include <stdint.h>

struct tcmulib_cmd;
struct tcmu_device;

size_t obd_cmd_iov_len(const struct tcmulib_cmd *cmd);
size_t obd_copy_to_iovec(const struct tcmulib_cmd *cmd, const void *buf, size_t len);
size_t obd_copy_from_iovec(const struct tcmulib_cmd *cmd, void *buf, size_t len);
size_t obd_zero_iovec_from(const struct tcmulib_cmd *cmd, size_t offset);
size_t obd_cmd_cdb_len(const struct tcmulib_cmd *cmd);
size_t obd_complete_data_in(struct tcmu_device *dev, struct tcmulib_cmd *cmd, const void *buf, size_t len);
void obd_set_sense(struct tcmulib_cmd *cmd, const uint8_t *sense, size_t len);
