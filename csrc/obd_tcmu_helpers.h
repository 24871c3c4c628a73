/* tcmu-obd C helpers: non-mutating scatter/gather over a command's iovec array, CDB length, one-call GOOD
 * completion, batched ring drain with READ(10)/(16) fields decoded. */
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

/* Batched ring drain (obd_tcmu_helpers.c): commands out, and for each 4 words of info:
 * disk offset of a READ answerable in place or OBD_NOT_IN_PLACE, length, buffer offset in
 * the data area, opcode. */
#define OBD_NOT_IN_PLACE 0xffffffffffffffffULL
size_t obd_peek_commands(struct tcmu_device *dev, struct tcmulib_cmd **cmds, uint64_t *info, size_t max,
                         const uint8_t *area, size_t area_len, uint64_t num_lbas, unsigned block_shift);
size_t obd_start_and_peek(struct tcmu_device *dev, struct tcmulib_cmd **cmds, uint64_t *info, size_t max,
                          const uint8_t *area, size_t area_len, uint64_t num_lbas, unsigned block_shift);
void obd_complete_in_place(struct tcmu_device *dev, struct tcmulib_cmd **cmds, size_t i, size_t filled);
