# Small helpers so that every component is one target with explicit dependencies
# (in the manner of Abseil's absl_cc_library).
#
#   rally_add_library(NAME rally_base SOURCES a.cc HEADERS a.h DEPS fmt::fmt [PRIVATE_DEPS ...])
#   rally_add_executable(NAME rally SOURCES main.cc DEPS rally_launcher)
#   rally_add_test(NAME base_status_test SOURCES status_test.cc DEPS rally_base LABELS unit [TIMEOUT 60])

set(RALLY_GENERATED_INCLUDE_DIR ${PROJECT_BINARY_DIR}/generated)

function(rally_target_defaults target)
  target_compile_features(${target} PUBLIC cxx_std_20)
  # Designated initializers that leave fields at their defaults are the intended idiom for
  # options structs, so -Wmissing-field-initializers is off.
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wno-unused-parameter
                                           -Wno-missing-field-initializers)
  if(RALLY_WARNINGS_AS_ERRORS)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(RALLY_SANITIZE)
    target_compile_options(${target} PUBLIC -fsanitize=address,undefined -fno-omit-frame-pointer
                                            -fno-sanitize-recover=undefined)
    target_link_options(${target} PUBLIC -fsanitize=address,undefined)
  endif()
endfunction()

function(rally_add_library)
  cmake_parse_arguments(ARG "" "NAME" "SOURCES;HEADERS;DEPS;PRIVATE_DEPS" ${ARGN})
  if(ARG_SOURCES)
    add_library(${ARG_NAME} STATIC ${ARG_SOURCES} ${ARG_HEADERS})
    target_include_directories(${ARG_NAME} PUBLIC ${PROJECT_SOURCE_DIR} ${RALLY_GENERATED_INCLUDE_DIR})
    target_link_libraries(${ARG_NAME} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
    set_target_properties(${ARG_NAME} PROPERTIES POSITION_INDEPENDENT_CODE ON)
    rally_target_defaults(${ARG_NAME})
  else()
    add_library(${ARG_NAME} INTERFACE ${ARG_HEADERS})
    target_include_directories(${ARG_NAME} INTERFACE ${PROJECT_SOURCE_DIR} ${RALLY_GENERATED_INCLUDE_DIR})
    target_link_libraries(${ARG_NAME} INTERFACE ${ARG_DEPS})
  endif()
endfunction()

function(rally_add_executable)
  cmake_parse_arguments(ARG "" "NAME;OUTPUT_NAME" "SOURCES;DEPS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS})
  if(ARG_OUTPUT_NAME)
    set_target_properties(${ARG_NAME} PROPERTIES OUTPUT_NAME ${ARG_OUTPUT_NAME})
  endif()
  rally_target_defaults(${ARG_NAME})
endfunction()

# Labels: unit, integration, chaos, mpi, gpu. Every test gets a timeout so that a hang fails
# instead of stalling CI.
function(rally_add_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SOURCES;DEPS;LABELS;ENVIRONMENT" ${ARGN})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 120)
  endif()
  add_executable(${ARG_NAME} ${ARG_SOURCES})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  rally_target_defaults(${ARG_NAME})
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME})
  set_tests_properties(${ARG_NAME} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT}
                       ENVIRONMENT "RALLY_BINARY_DIR=${PROJECT_BINARY_DIR};${ARG_ENVIRONMENT}")
endfunction()
