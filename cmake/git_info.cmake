# Writes OUT (a header defining MOETP_GIT_COMMIT) from `git describe` of SRC, rewriting it only when
# the text changes, so that a build after a new commit reports it without rebuilding everything.
# Run at every build: cmake -DSRC=<repo> -DOUT=<header> -P git_info.cmake
execute_process(COMMAND git -C "${SRC}" describe --always --dirty --abbrev=12
                OUTPUT_VARIABLE commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR commit STREQUAL "")
  set(commit "unknown (not a git checkout)")
endif()
set(text "#pragma once\n#define MOETP_GIT_COMMIT \"${commit}\"\n")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE "${OUT}" "${text}")
endif()
